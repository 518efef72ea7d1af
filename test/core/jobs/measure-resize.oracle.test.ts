// measure and resize against qemu-img. `strata measure` prints exactly what `qemu-img measure`
// prints (JSON and human) for sources of every kind and for the target options that change the
// numbers; `strata resize` grows (also past the L1 table's capacity), refuses to shrink without
// --shrink (leaving the file byte-identical), shrinks with it as qemu-img does, and resizes raw.
import { execFileSync } from 'node:child_process';
import { closeSync, openSync, readSync, statSync, writeFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { describeOracle, qemuImg, qemuImgRun, qemuIo, tempDir } from '../../oracle/qemu';
import {
  allocatedBytes, expectClean, expectSameContent, fileHash, fileSize, guestHash, KiB, MiB, qemuInfo, qemuIoMismatches, rng, strata, strataOk, randomBytes,
} from './helpers';

const GiB = 1024 * MiB;

function cpSparse(from: string, to: string): void {
  execFileSync('cp', ['--sparse=always', from, to]);
}


/** qemu-img compare: identical guest content (images of different sizes: the rest reads zero). */
function expectSameGuest(a: string, b: string): void {
  const r = qemuImgRun('compare', '-U', a, b);
  expect({ a, b, status: r.status, identical: /Images are identical/.test(r.stdout) }).toEqual({ a, b, status: 0, identical: true });
}

/** The header's l1_size (entries), big-endian u32 at offset 36. */
function l1Size(file: string): number {
  const b = Buffer.alloc(4);
  const fd = openSync(file, 'r');
  try { readSync(fd, b, 0, 4, 36); } finally { closeSync(fd); }
  return b.readUInt32BE(0);
}

describeOracle('measure against qemu-img', () => {
  const t = tempDir('strata-measure-');
  const sources: Record<string, string> = {};

  beforeAll(() => {
    const rand = t.path('rand.bin');
    writeFileSync(rand, randomBytes(5, 3 * MiB));
    const mixed = [
      `write -s ${rand} ${MiB + 100} 3M`, 'write -P 0x21 20M 4M', 'write -z 21M 1M', 'write -P 0 40M 2M', 'write -z 60M 3M',
      'write -P 0x22 100M 12345', 'write -c -P 0x23 120M 128k', `write -P 0x24 ${256 * MiB - 512} 512`,
    ];
    const r = rng(3);
    for (let i = 0; i < 30; i++) mixed.push(`write -P ${1 + i} ${Math.floor(r() * 250 * MiB)} ${1 + Math.floor(r() * 9000)}`);

    sources.qcow2 = t.path('mixed.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', sources.qcow2, String(256 * MiB));
    qemuIo(sources.qcow2, mixed);

    sources['4k-clusters'] = t.path('small-clusters.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', sources['4k-clusters'], String(256 * MiB));
    qemuIo(sources['4k-clusters'], mixed);

    sources['extended-l2'] = t.path('ext.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=128k,extended_l2=on', sources['extended-l2'], String(256 * MiB));
    qemuIo(sources['extended-l2'], mixed);

    sources['compat-0.10'] = t.path('v2.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', sources['compat-0.10'], String(256 * MiB));
    qemuIo(sources['compat-0.10'], mixed.filter((c) => !c.startsWith('write -z')));

    sources.raw = t.path('holes.raw');
    qemuImg('create', '-q', '-f', 'raw', sources.raw, String(GiB + 3 * 512));
    qemuIo(sources.raw, [`write -s ${rand} 0 3M`, 'write -P 0x31 500M 1M', 'write -P 0 600M 1M', `write -P 0x32 ${GiB} 1536`], { format: 'raw' });

    // A chain: measure counts what the whole chain shows.
    const base = t.path('base.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', base, String(256 * MiB));
    qemuIo(base, ['write -P 0x41 0 16M', 'write -P 0x42 128M 8M']);
    sources.overlay = t.path('top.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', sources.overlay);
    qemuIo(sources.overlay, ['write -P 0x43 8M 16M', 'write -z 130M 2M', 'write -P 0x44 200M 1M']);

    // Persistent bitmaps (qemu-img bitmap --add), of several granularities and name lengths.
    sources.bitmaps = t.path('bitmaps.qcow2');
    cpSparse(sources.qcow2, sources.bitmaps);
    qemuImg('bitmap', '--add', sources.bitmaps, 'b0');
    qemuImg('bitmap', '--add', '-g', '4k', sources.bitmaps, 'a-rather-longer-bitmap-name-for-the-directory');
    qemuImg('bitmap', '--add', '-g', '2M', '--disable', sources.bitmaps, 'b2');
  });
  afterAll(() => t.cleanup());

  const optionSets: { name: string; args: string[] }[] = [
    { name: '-O qcow2', args: ['-O', 'qcow2'] },
    { name: 'cluster_size=4k', args: ['-O', 'qcow2', '-o', 'cluster_size=4k'] },
    { name: 'cluster_size=512', args: ['-O', 'qcow2', '-o', 'cluster_size=512'] },
    { name: 'cluster_size=2M', args: ['-O', 'qcow2', '-o', 'cluster_size=2M'] },
    { name: 'refcount_bits=1', args: ['-O', 'qcow2', '-o', 'refcount_bits=1'] },
    { name: 'refcount_bits=64', args: ['-O', 'qcow2', '-o', 'refcount_bits=64'] },
    { name: 'extended_l2=on', args: ['-O', 'qcow2', '-o', 'extended_l2=on'] },
    { name: 'cluster_size=16k,extended_l2=on,refcount_bits=8', args: ['-O', 'qcow2', '-o', 'cluster_size=16k,extended_l2=on,refcount_bits=8'] },
    { name: 'preallocation=metadata', args: ['-O', 'qcow2', '-o', 'preallocation=metadata'] },
    { name: '-O raw', args: ['-O', 'raw'] },
  ];

  /** Every difference between `strata measure ARGS` and `qemu-img measure ARGS`, JSON and human. */
  async function differences(args: string[][], tail: string[], label: (i: number) => string, refusals: 'compare' | 'skip' = 'compare'): Promise<unknown[]> {
    const out: unknown[] = [];
    for (let i = 0; i < args.length; i++) {
      for (const output of ['json', 'human']) {
        const q = qemuImgRun('measure', `--output=${output}`, ...args[i]!, ...tail);
        if (q.status !== 0 && refusals === 'skip') continue;
        const ours = await strata('measure', `--output=${output}`, ...args[i]!, ...tail);
        if (q.status !== 0) {
          // qemu-img refuses (e.g. "The image size is too large"): strata must refuse too.
          if (ours.code === 0) out.push({ options: label(i), output, qemu: `exit ${q.status}: ${q.stderr}`, strata: ours.out });
          continue;
        }
        if (ours.code !== 0 || ours.out !== q.stdout) {
          out.push({ options: label(i), output, qemu: q.stdout, strata: ours.code === 0 ? ours.out : `exit ${ours.code}: ${ours.err}` });
        }
      }
    }
    return out;
  }

  const sourceNames = ['qcow2', '4k-clusters', 'extended-l2', 'compat-0.10', 'raw', 'overlay', 'bitmaps'];
  for (const s of sourceNames) {
    it(`${s} source: --output=json and human output equal qemu-img's for every option set`, async () => {
      expect(await differences(optionSets.map((o) => o.args), [sources[s]!], (i) => optionSets[i]!.name)).toEqual([]);
    });
  }

  it('bitmaps are counted (the bitmaps field is not 0)', () => {
    const q = JSON.parse(qemuImg('measure', '--output=json', '-O', 'qcow2', sources.bitmaps!)) as { bitmaps?: number };
    expect(q.bitmaps).toBeGreaterThan(0);
  });

  for (const size of ['1T', '0', '1G', '100M', '16T', '123456789']) {
    it(`--size ${size}: equals qemu-img for every option set qemu-img accepts`, async () => {
      expect(await differences(optionSets.map((o) => o.args), ['--size', size], (i) => optionSets[i]!.name, 'skip')).toEqual([]);
    });
  }

  it('sizes too large for the cluster size (L1 table over 32 MiB) are refused, as by qemu-img', async () => {
    const cases = [
      ['-O', 'qcow2', '-o', 'cluster_size=512', '--size', '1T'], ['-O', 'qcow2', '-o', 'cluster_size=4k', '--size', '16T'],
      ['-O', 'qcow2', '-o', 'cluster_size=16k,extended_l2=on', '--size', '65T'],
    ];
    expect(await differences(cases, [], (i) => cases[i]!.join(' '))).toEqual([]);
  });

  // A compat=0.10 (v2) target cannot hold bitmaps: qemu-img prints no bitmaps field then.
  it('-o compat=0.10 target: equals qemu-img (no bitmaps field) for every source', async () => {
    const names = sourceNames;
    expect(await differences(names.map((n) => ['-O', 'qcow2', '-o', 'compat=0.10', sources[n]!]), [], (i) => `${names[i]} source`)).toEqual([]);
  });

  // qemu-img measure takes preallocation=falloc|full (required = fully allocated).
  it('-o preallocation=full and =falloc: equal qemu-img', async () => {
    const cases = [
      ['-O', 'qcow2', '-o', 'preallocation=full', sources.qcow2!], ['-O', 'qcow2', '-o', 'preallocation=falloc', sources.qcow2!],
      ['-O', 'qcow2', '-o', 'preallocation=full', '--size', '1G'], ['-O', 'raw', '-o', 'preallocation=full', '--size', '1G'],
    ];
    expect(await differences(cases, [], (i) => cases[i]!.join(' '))).toEqual([]);
  });
});

describeOracle('resize against qemu-img', () => {
  const t = tempDir('strata-resize-');
  afterAll(() => t.cleanup());

  function dataImage(name: string, opts: string, size: number, cmds: string[]): string {
    const f = t.path(name);
    qemuImg('create', '-q', '-f', 'qcow2', '-o', opts, f, String(size));
    qemuIo(f, cmds);
    return f;
  }

  it('resize IMG +1G: qemu-img info shows the new size, check is clean, data and zeros read the same', async () => {
    const img = dataImage('grow.qcow2', 'cluster_size=64k', 256 * MiB, ['write -P 0x11 0 8M', 'write -P 0x12 100M 3M', `write -P 0x13 ${256 * MiB - 4096} 4096`]);
    const orig = t.path('grow-orig.qcow2');
    cpSparse(img, orig);
    const r = await strataOk('resize', img, '+1G');
    expect(r.out).toBe('Image resized.\n');
    expect(qemuInfo(img)['virtual-size']).toBe(256 * MiB + GiB);
    expectClean(img);
    // qemu-img compare treats the part past the shorter image as needing to read zero.
    expectSameGuest(orig, img);
    // The new space is usable.
    qemuIo(img, [`write -P 0x14 ${GiB} 1M`]);
    expectClean(img);
    expect(qemuIoMismatches(img, ['read -P 0x11 0 8M', `read -P 0x13 ${256 * MiB - 4096} 4096`, `read -P 0 ${256 * MiB} 1M`, `read -P 0x14 ${GiB} 1M`])).toEqual([]);
  });

  it('growth that needs a larger L1 table (4 KiB clusters, 1G -> 100G) keeps the data', async () => {
    const img = dataImage('l1.qcow2', 'cluster_size=4k', GiB, ['write -P 0x21 0 3M', 'write -P 0x22 500M 1M', `write -P 0x23 ${GiB - 8192} 8192`, 'write -z 1M 64k']);
    const theirs = t.path('l1-qemu.qcow2');
    cpSparse(img, theirs);
    const l1Before = l1Size(img);
    await strataOk('resize', img, '100G');
    qemuImg('resize', '-q', theirs, '100G');
    expect(qemuInfo(img)['virtual-size']).toBe(100 * GiB);
    expectClean(img);
    // 100 GiB of 4 KiB clusters needs 51200 L1 entries (512 entries per L2 table).
    expect({ before: l1Before, after: l1Size(img) }).toEqual({ before: 512, after: l1Size(theirs) });
    expect(l1Size(img)).toBeGreaterThanOrEqual(51200);
    expectSameContent(theirs, img);
    console.log(`[resize] 1G -> 100G (4k clusters): l1_size ${l1Before} -> ${l1Size(img)}; strata file ${fileSize(img)} B / allocated ${allocatedBytes(img)} B; qemu-img ${fileSize(theirs)} / ${allocatedBytes(theirs)}`);
    expect(allocatedBytes(img)).toBeLessThanOrEqual(allocatedBytes(theirs) * 1.02);
    expect(qemuIoMismatches(img, ['read -P 0x21 0 1M', 'read -P 0 1M 64k', 'read -P 0x22 500M 1M', `read -P 0x23 ${GiB - 8192} 8192`])).toEqual([]);
    // Writes past the old end land in L2 tables the new L1 points to.
    qemuIo(img, [`write -P 0x24 ${99 * GiB} 1M`, `write -P 0x25 ${100 * GiB - 4096} 4096`]);
    expectClean(img);
    expect(qemuIoMismatches(img, [`read -P 0x24 ${99 * GiB} 1M`, `read -P 0x25 ${100 * GiB - 4096} 4096`, 'read -P 0x21 0 1M'])).toEqual([]);
  });

  it('resize IMG 10M (smaller) without --shrink fails with one line and leaves the file byte-identical', async () => {
    const img = dataImage('noshrink.qcow2', 'cluster_size=64k', 64 * MiB, ['write -P 0x31 0 4M', 'write -P 0x32 30M 2M']);
    const hash = fileHash(img);
    const mtime = statSync(img).mtimeMs;
    const r = await strata('resize', img, '10M');
    expect(r.code).not.toBe(0);
    expect(r.err.trim().split('\n')).toHaveLength(1);
    expect(r.err).toMatch(/--shrink/);
    expect(fileHash(img)).toBe(hash);
    expect(statSync(img).mtimeMs).toBe(mtime);
    // A relative shrink is refused the same way.
    const r2 = await strata('resize', img, '-5M');
    expect(r2.code).not.toBe(0);
    expect(fileHash(img)).toBe(hash);
  });

  const shrinkCmds = [
    'write -P 0x41 0 4M', 'write -z 1M 64k', 'write -P 0x42 8M 1536k' /* ends before 10M */,
    `write -P 0x43 ${10 * MiB - 4096} 8192` /* crosses the new end */, 'write -P 0x44 30M 8M', 'write -P 0x45 60M 4M', 'write -c -P 0x46 50M 128k',
  ];
  for (const opts of ['cluster_size=64k', 'cluster_size=4k', 'cluster_size=128k,extended_l2=on']) {
    it(`resize --shrink IMG 10M (${opts}): check clean, data before the new end intact, file as small as qemu-img's`, async () => {
      const img = dataImage(`shrink-${opts.replace(/[=,]/g, '_')}.qcow2`, opts, 64 * MiB, shrinkCmds);
      const theirs = `${img}.qemu`;
      cpSparse(img, theirs);
      await strataOk('resize', '--shrink', img, '10M');
      qemuImg('resize', '-q', '--shrink', theirs, '10M');
      expect(qemuInfo(img)['virtual-size']).toBe(10 * MiB);
      expectClean(img);
      expectSameContent(theirs, img);
      expect(qemuIoMismatches(img, ['read -P 0x41 0 1M', 'read -P 0 1M 64k', 'read -P 0x41 1088k 2496k', 'read -P 0x42 8M 1536k', `read -P 0x43 ${10 * MiB - 4096} 4096`])).toEqual([]);
      console.log(`[resize] --shrink 64M -> 10M (${opts}): strata file ${fileSize(img)} B / allocated ${allocatedBytes(img)} B; qemu-img ${fileSize(theirs)} / ${allocatedBytes(theirs)}`);
      // The file is truncated as far as qemu-img truncates it; allocation within 2% plus two
      // clusters' worth of slack (strata leaves the header cluster fully allocated).
      expect.soft({ fileSize: fileSize(img), notLarger: fileSize(img) <= fileSize(theirs) }).toEqual({ fileSize: fileSize(img), notLarger: true });
      expect.soft(allocatedBytes(img)).toBeLessThanOrEqual(allocatedBytes(theirs) * 1.02 + 128 * KiB);
      // Growing back shows zeros past 10M, not the old data.
      await strataOk('resize', img, '64M');
      expectClean(img);
      expect(qemuIoMismatches(img, [`read -P 0 ${10 * MiB} 54M`])).toEqual([]);
    });
  }

  it('relative shrink with --shrink (IMG -5M)', async () => {
    const img = dataImage('relshrink.qcow2', 'cluster_size=64k', 20 * MiB, ['write -P 0x51 0 20M']);
    await strataOk('resize', '--shrink', img, '-5M');
    expect(qemuInfo(img)['virtual-size']).toBe(15 * MiB);
    expectClean(img);
    expect(qemuIoMismatches(img, ['read -P 0x51 0 15M'])).toEqual([]);
  });

  it('growing an image with an internal snapshot: the snapshot reads as after qemu-img resize', async () => {
    const img = dataImage('snap.qcow2', 'cluster_size=64k', 32 * MiB, ['write -P 0x61 0 2M']);
    qemuImg('snapshot', '-c', 'S', img);
    qemuIo(img, ['write -P 0x62 0 1M']);
    const theirs = t.path('snap-qemu.qcow2');
    cpSparse(img, theirs);
    await strataOk('resize', img, '+32M');
    qemuImg('resize', '-q', theirs, '+32M');
    expect(qemuInfo(img)['virtual-size']).toBe(64 * MiB);
    expectClean(img);
    expect(guestHash(img, { snapshot: 'S' })).toBe(guestHash(theirs, { snapshot: 'S' }));
    expect(qemuInfo(img).snapshots).toEqual(qemuInfo(theirs).snapshots);
    expectSameContent(theirs, img);
    expect(qemuIoMismatches(img, ['read -P 0x62 0 1M', 'read -P 0x61 1M 1M', `read -P 0 ${32 * MiB} 32M`])).toEqual([]);
  });

  describe('raw', () => {
    it('grows (sparse) and shrinks the file; shrinking needs --shrink', async () => {
      const img = t.path('disk.raw');
      qemuImg('create', '-q', '-f', 'raw', img, String(64 * MiB));
      qemuIo(img, ['write -P 0x71 0 2M', 'write -P 0x72 20M 1M'], { format: 'raw' });
      await strataOk('resize', '-f', 'raw', img, '+192M');
      expect(fileSize(img)).toBe(256 * MiB);
      expect(allocatedBytes(img)).toBeLessThanOrEqual(4 * MiB);
      expect(qemuInfo(img)['virtual-size']).toBe(256 * MiB);

      const hash = fileHash(img);
      const refused = await strata('resize', '-f', 'raw', img, '10M');
      expect(refused.code).not.toBe(0);
      expect(refused.err.trim().split('\n')).toHaveLength(1);
      expect(fileHash(img)).toBe(hash);

      await strataOk('resize', '-f', 'raw', '--shrink', img, '21M');
      expect(fileSize(img)).toBe(21 * MiB);
      expect(qemuIoMismatches(img, ['read -P 0x71 0 2M', 'read -P 0x72 20M 1M'])).toEqual([]);
      // Probed format works too.
      await strataOk('resize', img, '+3M');
      expect(fileSize(img)).toBe(24 * MiB);
    });
  });
});
