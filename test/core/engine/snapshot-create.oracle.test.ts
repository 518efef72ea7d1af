// snapshot -c laid out as qemu-img lays it out, and crash-safe on the way there.
//   Layout: the same image snapshotted by qemu-img and by strata gives the same file, byte for
//   byte (the new entry's date aside), for v2 and v3 images, small and large clusters, extended
//   L2, compressed clusters, images with snapshots already, a backing file, a snapshot table that
//   moves into a hole, many refcount blocks, no L2 table at all; qemu-img's failure when a refcount would
//   overflow (the L1 copy it leaks) under the name qemu-img, a refusal with nothing written
//   under strata's.
//   Crashes: at every cut point of the create (each with several subsets of the unflushed
//   sectors landed, in any order), the image checks without corruption (leaks allowed), the
//   active layer and the snapshots it had read as before, and the new snapshot, where it is
//   there, reads as the active layer.
import { readFileSync, writeFileSync, copyFileSync, statSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { expect, it } from 'vitest';
import { describeOracle, qemuCheck, qemuImg, qemuImgRun, qemuIo, tempDir } from '../../oracle/qemu';
import { asQemuImg, strata } from '../../cli/run-cli';
import { rng } from '../jobs/helpers';
import { MemoryFile } from '../../../core/io/memory-file';
import { Qcow2Image } from '../../../core/engine/qcow2';
import { Qcow2Writable } from '../../../core/engine/qcow2-write';
import { createSnapshot } from '../../../core/engine/snapshots';
import { CrashLog } from '../../support/crash-log';

interface Kind {
  name: string;
  /** Builds img.qcow2 (and anything it needs) in the folder `at` names files in. */
  build: (at: (n: string) => string) => void;
}

const KINDS: Kind[] = [
  {
    name: 'v3, 4 KiB clusters, data and compressed clusters',
    build: (at) => {
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', at('img.qcow2'), '8M');
      qemuIo(at('img.qcow2'), ['write -P 0x11 0 1M', 'write -c -P 0x12 2M 64k', 'write -z 3M 64k', 'write -P 0x13 7M 8k']);
    },
  },
  {
    name: 'v2 (compat=0.10), 64 KiB clusters, a snapshot already',
    build: (at) => {
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', at('img.qcow2'), '16M');
      qemuIo(at('img.qcow2'), ['write -P 0x21 0 5M', 'write -P 0x22 12M 1M']);
      qemuImg('snapshot', '-c', 'one', at('img.qcow2'));
      qemuIo(at('img.qcow2'), ['write -P 0x23 1M 64k', 'write -P 0x24 14M 64k']);
    },
  },
  {
    name: 'v3, 2 MiB clusters',
    build: (at) => {
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=2M', at('img.qcow2'), '1G');
      qemuIo(at('img.qcow2'), ['write -P 0x31 0 5M', 'write -P 0x32 600M 1M']);
    },
  },
  {
    name: 'extended L2, 64 KiB clusters, two snapshots already',
    build: (at) => {
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=64k,extended_l2=on', at('img.qcow2'), '16M');
      qemuIo(at('img.qcow2'), ['write -P 0x41 0 5M', 'write -P 0x42 1000k 4k']);
      qemuImg('snapshot', '-c', 's1', at('img.qcow2'));
      qemuIo(at('img.qcow2'), ['write -z 10M 1M']);
      qemuImg('snapshot', '-c', 's2', at('img.qcow2'));
      qemuIo(at('img.qcow2'), ['write -P 0x43 3M 4k', 'write -P 0x44 15M 64k']);
    },
  },
  {
    name: 'an overlay with a backing file',
    build: (at) => {
      qemuImg('create', '-q', '-f', 'qcow2', at('base.qcow2'), '16M');
      qemuIo(at('base.qcow2'), ['write -P 0x51 0 16M']);
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=16k', '-b', 'base.qcow2', '-F', 'qcow2', at('img.qcow2'));
      qemuIo(at('img.qcow2'), ['write -P 0x52 100k 200k', 'write -z 5M 64k', 'write -P 0x53 15M 16k']);
    },
  },
  {
    name: 'snapshot table moving into a hole (a snapshot deleted), 512 B clusters, 64-bit refcounts',
    build: (at) => {
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512,refcount_bits=64', at('img.qcow2'), '4M');
      qemuIo(at('img.qcow2'), ['write -P 0x61 0 1M']);
      qemuImg('snapshot', '-c', 'a', at('img.qcow2'));
      qemuIo(at('img.qcow2'), ['write -P 0x62 0 256k']);
      qemuImg('snapshot', '-c', 'b', at('img.qcow2'));
      qemuIo(at('img.qcow2'), ['write -P 0x63 512k 256k']);
      qemuImg('snapshot', '-d', 'a', at('img.qcow2'));
    },
  },
  {
    name: '512 B clusters, 16-bit refcounts, many L2 tables and refcount blocks',
    build: (at) => {
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', at('img.qcow2'), '4M');
      qemuIo(at('img.qcow2'), ['write -P 0x71 0 1M', 'write -P 0x72 3M 512k']);
    },
  },
  {
    name: 'an empty image (no L2 table)',
    build: (at) => { qemuImg('create', '-q', '-f', 'qcow2', at('img.qcow2'), '1M'); },
  },
];

/** The image with the date of its last snapshot entry (which qemu-img takes from the clock) zeroed. */
function withoutLastDate(file: string): Buffer {
  const d = readFileSync(file);
  const nb = d.readUInt32BE(60);
  let p = Number(d.readBigUInt64BE(64));
  let last = p;
  for (let i = 0; i < nb; i++) {
    last = p;
    p += 40 + d.readUInt32BE(p + 36) + d.readUInt16BE(p + 12) + d.readUInt16BE(p + 14);
    p = Math.ceil(p / 8) * 8;
  }
  d.fill(0, last + 16, last + 24);
  return d;
}

function hashOf(b: Buffer): string {
  return createHash('sha256').update(b).digest('hex').slice(0, 16);
}

describeOracle('snapshot -c laid out as qemu-img lays it out', () => {
  for (const k of KINDS) {
    it(`${k.name}: byte for byte as qemu-img's`, async () => {
      const t = tempDir();
      try {
        k.build(t.path);
        copyFileSync(t.path('img.qcow2'), t.path('ours.qcow2'));
        qemuImg('snapshot', '-c', 'new', t.path('img.qcow2'));
        const r = await strata('snapshot', '-c', 'new', t.path('ours.qcow2'));
        expect(r.err).toBe('');
        expect(r.code).toBe(0);
        const theirs = withoutLastDate(t.path('img.qcow2'));
        const ours = withoutLastDate(t.path('ours.qcow2'));
        expect(ours.length).toBe(theirs.length);
        expect(ours.equals(theirs)).toBe(true);
        expect(qemuCheck(t.path('ours.qcow2')).status).toBe(0);
      } finally {
        t.cleanup();
      }
    });
  }

  it('a refcount that would overflow: qemu-img\'s leaked L1 copy under its name, nothing written under strata\'s', async () => {
    const t = tempDir();
    try {
      for (const [name, opts] of [['one.qcow2', 'refcount_bits=1'], ['two.qcow2', 'refcount_bits=2']] as const) {
        qemuImg('create', '-q', '-f', 'qcow2', '-o', opts, t.path(name), '64M');
        qemuIo(t.path(name), ['write 0 512']);
        // Two snapshots fill 2-bit refcounts (3 references): the third overflows.
        if (name === 'two.qcow2') for (const s of ['foo', 'bar']) qemuImg('snapshot', '-c', s, t.path(name));
        copyFileSync(t.path(name), t.path(`q-${name}`));
        copyFileSync(t.path(name), t.path(`s-${name}`));
        const q = qemuImgRun('snapshot', '-c', 'baz', t.path(name));
        const ours = await asQemuImg('snapshot', '-c', 'baz', t.path(`q-${name}`));
        expect(ours.code).toBe(1);
        expect(ours.err).toBe(q.stderr);
        expect(readFileSync(t.path(`q-${name}`)).equals(readFileSync(t.path(name)))).toBe(true);
        const check = qemuImgRun('check', t.path(`q-${name}`));
        expect(check.stdout).toMatch(/1 leaked clusters were found/);
        const before = readFileSync(t.path(`s-${name}`));
        const own = await strata('snapshot', '-c', 'baz', t.path(`s-${name}`));
        expect(own.code).not.toBe(0);
        expect(own.err.trim().split('\n')).toHaveLength(1);
        expect(readFileSync(t.path(`s-${name}`)).equals(before)).toBe(true);
      }
      // Clusters the refcounts do not reach (iotest 080): qemu-img fails with -27 when the
      // refcount table would pass its limit, -11 when a block would have to be made; a snapshot
      // table past the end of the file with the most snapshots there may be: -27 as well.
      const poke = (file: string, at: number, hex: string) => {
        const b = readFileSync(file);
        Buffer.from(hex, 'hex').copy(b, at);
        writeFileSync(file, b);
      };
      const cases: [string, (f: string) => void][] = [
        ['reserved bits and a huge offset', (f) => { qemuIo(f, ['write 0 512']); poke(f, 0x40000, 'bfffffffffff0000'); }],
        ['an offset without a refcount block', (f) => { qemuIo(f, ['write 0 512']); poke(f, 0x40000, '800000ffffff0000'); }],
        ['65536 snapshots in a table past the end of the file', (f) => { poke(f, 64, '0000000001000000'); poke(f, 60, '00010000'); }],
      ];
      for (const [what, damage] of cases) {
        const f = t.path('dmg.qcow2');
        qemuImg('create', '-q', '-f', 'qcow2', f, '64M');
        damage(f);
        copyFileSync(f, t.path('q-dmg.qcow2'));
        copyFileSync(f, t.path('s-dmg.qcow2'));
        const q = qemuImgRun('snapshot', '-c', 'test', f);
        const ours = await asQemuImg('snapshot', '-c', 'test', t.path('q-dmg.qcow2'));
        expect({ what, err: ours.err, code: ours.code }).toEqual({ what, err: q.stderr, code: q.status });
        const before = readFileSync(t.path('s-dmg.qcow2'));
        const own = await strata('snapshot', '-c', 'test', t.path('s-dmg.qcow2'));
        expect(own.code).not.toBe(0);
        expect(own.err.trim().split('\n')).toHaveLength(1);
        expect(readFileSync(t.path('s-dmg.qcow2')).equals(before)).toBe(true);
      }
      // qemu-img snapshots an image with 1-bit refcounts and no data (nothing to count twice).
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'refcount_bits=1', t.path('empty.qcow2'), '1M');
      copyFileSync(t.path('empty.qcow2'), t.path('q-empty.qcow2'));
      qemuImg('snapshot', '-c', 'e', t.path('empty.qcow2'));
      expect((await asQemuImg('snapshot', '-c', 'e', t.path('q-empty.qcow2'))).code).toBe(0);
      expect(withoutLastDate(t.path('q-empty.qcow2')).equals(withoutLastDate(t.path('empty.qcow2')))).toBe(true);
    } finally {
      t.cleanup();
    }
  });
});

/** Guest content of the active layer and of each snapshot, as our engine reads them (no backing file). */
async function contents(bytes: Buffer): Promise<{ active: string; snapshots: Map<string, string> }> {
  const img = await Qcow2Image.open('cut', new MemoryFile('cut', bytes));
  const read = async (v: Qcow2Image, size: number) => {
    const b = Buffer.alloc(size);
    await v.read(b, 0);
    return hashOf(b);
  };
  const snapshots = new Map<string, string>();
  for (const s of img.snapshots) snapshots.set(s.name, await read(await img.snapshotView(s), s.diskSize ?? img.virtualSize));
  return { active: await read(img, img.virtualSize), snapshots };
}

/** Random subsets per cut point (besides none and all of the unflushed sectors). */
const SUBSETS = 1;
/** Cut points checked at most per image (spread over the run, the first and last included). */
const POINTS = 160;

describeOracle('snapshot -c under crashes (reordered, torn writes between flushes)', () => {
  for (const k of KINDS.filter((x) => !x.name.includes('backing') && !x.name.includes('2 MiB'))) {
    it(`${k.name}: every cut point checks clean but for leaks and reads as before`, { timeout: 300_000 }, async () => {
      const t = tempDir();
      try {
        k.build(t.path);
        const initial = readFileSync(t.path('img.qcow2'));
        const before = await contents(initial);
        const log = new CrashLog();
        const file = await log.wrap(new MemoryFile('mem.qcow2', initial));
        const img = await Qcow2Writable.openWritable('mem.qcow2', file);
        await createSnapshot(img, 'new');
        await img.close();
        const all = log.cutPoints();
        const points = all.length <= POINTS ? all : Array.from({ length: POINTS }, (_, i) => all[Math.round((i * (all.length - 1)) / (POINTS - 1))]!);
        const r = rng(7);
        const cut = t.path('cut.qcow2');
        const seen = new Set<string>();
        const problems: string[] = [];
        let withSnapshot = 0;
        for (const at of points) {
          const choices: (() => boolean)[] = [() => false, () => true];
          for (let i = 0; i < SUBSETS; i++) { const p = r(); choices.push(() => r() < p); }
          for (const keep of choices) {
            const { files } = log.stateAt(at, keep);
            const bytes = files.get('mem.qcow2')!;
            const key = hashOf(bytes);
            if (seen.has(key)) continue;
            seen.add(key);
            writeFileSync(cut, bytes);
            const c = qemuCheck(cut);
            const corruptions = Number(c.json.corruptions ?? 0) + Number(c.json['check-errors'] ?? 0);
            if (corruptions || ![0, 3].includes(c.status)) problems.push(`cut at ${at}: qemu-img check: ${JSON.stringify(c.json)}`);
            const got = await contents(bytes);
            if (got.active !== before.active) problems.push(`cut at ${at}: the active layer changed`);
            for (const [n, h] of before.snapshots) if (got.snapshots.get(n) !== h) problems.push(`cut at ${at}: snapshot ${n} changed`);
            const created = got.snapshots.get('new');
            if (created !== undefined) {
              withSnapshot++;
              if (created !== before.active) problems.push(`cut at ${at}: the new snapshot does not read as the active layer`);
            }
          }
        }
        expect(problems).toEqual([]);
        // The run has the two switches and their flushes; states without and with the snapshot were seen.
        expect(log.counts().flushes).toBeGreaterThanOrEqual(4);
        expect(withSnapshot).toBeGreaterThan(0);
        expect(seen.size).toBeGreaterThan(4);
        // And the end state is qemu-img's layout: clean, no leaks.
        writeFileSync(cut, log.stateAt(points[points.length - 1]!, () => true).files.get('mem.qcow2')!);
        expect(qemuCheck(cut).status).toBe(0);
        expect(statSync(cut).size).toBeGreaterThan(0);
      } finally {
        t.cleanup();
      }
    });
  }
});
