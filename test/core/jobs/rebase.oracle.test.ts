// Rebase against qemu-img: the overlay reads exactly the same afterwards, it allocates no more
// than qemu-img's own rebase of an identical copy, differing data is written in whole
// (sub)clusters, -u touches only the header, -b '' flattens, and names stay as given.
import { execFileSync } from 'node:child_process';
import { mkdirSync, renameSync } from 'node:fs';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { describeOracle, qemuImg, qemuImgRun, qemuIo, tempDir } from '../../oracle/qemu';
import { rebase } from '../../../core/jobs/rebase';
import {
  allocatedBytes, batches, expectClean, expectSameContent, fileHash, fileSize, guestHash, KiB, MiB,
  qemuInfo, qemuIoMismatches, qemuMap, rng, strata, strataOk,
} from './helpers';

const SIZE = 128 * MiB;

function cpSparse(from: string, to: string): void {
  execFileSync('cp', ['--sparse=always', from, to]);
}

/** Thousands of scattered 512 B - 8 KiB writes (denser at low offsets), a few zero writes and discards. */
function scatteredWrites(seed: number, count: number, size: number): string[] {
  const r = rng(seed);
  const cmds: string[] = [];
  for (let i = 0; i < count; i++) {
    const len = 512 + Math.floor(r() * (8 * KiB - 512 + 1));
    const off = Math.floor(r() * r() * (size - len));
    const k = r();
    if (k < 0.85) cmds.push(`write -P ${1 + Math.floor(r() * 254)} ${off} ${len}`);
    else if (k < 0.95) cmds.push(`write -z ${off} ${len}`);
    else cmds.push(`discard ${off - (off % 4096)} 4096`);
  }
  return cmds;
}

describeOracle('rebase against qemu-img', () => {
  // One 3-chain shared by the scenario-1 cases: base <- mid (4 KiB clusters, scattered writes).
  const proto = tempDir('strata-rebase-proto-');
  const protoBase = proto.path('base.qcow2');
  const protoMid = proto.path('mid.qcow2');

  beforeAll(() => {
    qemuImg('create', '-q', '-f', 'qcow2', protoBase, String(SIZE));
    const r = rng(11);
    const fill = ['write -P 0x11 0 40M', 'write -P 0x22 60M 40M', 'write -z 70M 2M'];
    for (let i = 0; i < 40; i++) fill.push(`write -P ${0x30 + i} ${Math.floor(r() * (SIZE - MiB))} ${4096 + Math.floor(r() * 300 * KiB)}`);
    qemuIo(protoBase, fill);
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', '-b', 'base.qcow2', '-F', 'qcow2', protoMid);
    for (const b of batches(scatteredWrites(12, 3000, SIZE), 1000)) qemuIo(protoMid, b);
  });
  afterAll(() => proto.cleanup());

  for (const variant of [
    { name: '64 KiB top', opts: 'cluster_size=64k' },
    { name: '128 KiB extended-L2 top', opts: 'cluster_size=128k,extended_l2=on' },
  ]) {
    it(`3-chain onto its base, ${variant.name}: same content, allocation within 1.05x of qemu-img rebase`, async () => {
      const t = tempDir();
      try {
        const s = t.path('strata');
        const q = t.path('qemu');
        mkdirSync(s);
        mkdirSync(q);
        for (const d of [s, q]) {
          cpSparse(protoBase, `${d}/base.qcow2`);
          cpSparse(protoMid, `${d}/mid.qcow2`);
        }
        const top = `${s}/top.qcow2`;
        qemuImg('create', '-q', '-f', 'qcow2', '-o', variant.opts, '-b', 'mid.qcow2', '-F', 'qcow2', top);
        const r = rng(13);
        const own: string[] = [];
        for (let i = 0; i < 60; i++) own.push(`write -P ${0x80 + i} ${Math.floor(r() * (SIZE - MiB))} ${1 + Math.floor(r() * 256 * KiB)}`);
        own.push('write -z 1M 64k', 'write -P 0xee 0 1');
        qemuIo(top, own);
        cpSparse(top, `${q}/top.qcow2`);
        const before = guestHash(top);
        const baseBytes = fileHash(`${s}/base.qcow2`);
        const midBytes = fileHash(`${s}/mid.qcow2`);
        const topBefore = allocatedBytes(top);

        const t0 = Date.now();
        const res = await rebase({}, top, { backing: 'base.qcow2', backingFormat: 'qcow2' });
        const strataMs = Date.now() - t0;
        const t1 = Date.now();
        qemuImg('rebase', '-b', 'base.qcow2', '-F', 'qcow2', `${q}/top.qcow2`);
        const qemuMs = Date.now() - t1;

        expectClean(top);
        expectClean(`${q}/top.qcow2`);
        const info = qemuInfo(top);
        expect(info['backing-filename']).toBe('base.qcow2');
        expect(info['backing-filename-format']).toBe('qcow2');
        expect(guestHash(top)).toBe(before);
        expectSameContent(top, `${q}/top.qcow2`);
        expect(fileHash(`${s}/base.qcow2`)).toBe(baseBytes);
        expect(fileHash(`${s}/mid.qcow2`)).toBe(midBytes);

        const ours = allocatedBytes(top);
        const theirs = allocatedBytes(`${q}/top.qcow2`);
        const ourActual = info['actual-size'];
        const theirActual = qemuInfo(`${q}/top.qcow2`)['actual-size'];
        console.log(`[rebase ${variant.name}] top before ${topBefore} B; after: strata ${ours} B (file ${fileSize(top)}), ` +
          `qemu-img ${theirs} B (file ${fileSize(`${q}/top.qcow2`)}), ratio ${(ours / theirs).toFixed(3)}; ` +
          `writes ${res.writes}, bytesWritten ${res.bytesWritten}, bytesCompared ${res.bytesCompared}; ` +
          `time strata ${strataMs} ms, qemu-img ${qemuMs} ms`);
        expect(ours).toBeLessThanOrEqual(theirs * 1.05);
        expect(ourActual).toBeLessThanOrEqual(theirActual * 1.05);
      } finally {
        t.cleanup();
      }
    });
  }

  for (const v of [
    { name: '64 KiB clusters', opts: 'cluster_size=64k', writes: 1, bytes: 65536, map: [[0, 65536, 0]] },
    // 2 KiB subclusters: only the differing first half is written, as 16 whole subclusters.
    { name: '64 KiB extended L2', opts: 'cluster_size=64k,extended_l2=on', writes: 1, bytes: 32768, map: [[0, 32768, 0], [32768, 32768, 1]] },
  ]) {
    it(`write alignment (${v.name}): differing half-cluster is written as one aligned write`, async () => {
      const t = tempDir();
      try {
        const base = t.path('base.qcow2');
        const mid = t.path('mid.qcow2');
        const top = t.path('top.qcow2');
        qemuImg('create', '-q', '-f', 'qcow2', base, '64k');
        qemuIo(base, ['write -P 0xaa 0 32k', 'write -P 0xcc 32k 32k']);
        qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', mid);
        qemuIo(mid, ['write -P 0xbb 0 32k', 'write -P 0xcc 32k 32k']);
        qemuImg('create', '-q', '-f', 'qcow2', '-o', v.opts, '-b', 'mid.qcow2', '-F', 'qcow2', top);
        const before = guestHash(top);

        const res = await rebase({}, top, { backing: 'base.qcow2', backingFormat: 'qcow2' });
        expect({ writes: res.writes, bytesWritten: res.bytesWritten }).toEqual({ writes: v.writes, bytesWritten: v.bytes });

        expectClean(top);
        expect(qemuInfo(top)['backing-filename']).toBe('base.qcow2');
        expect(guestHash(top)).toBe(before);
        expect(qemuIoMismatches(top, ['read -P 0xbb 0 32k', 'read -P 0xcc 32k 32k'])).toEqual([]);
        // Merge adjacent map entries by depth to compare the layout.
        const runs: number[][] = [];
        for (const e of qemuMap(top)) {
          const last = runs[runs.length - 1];
          if (last && last[2] === e.depth && last[0]! + last[1]! === e.start) last[1]! += e.length;
          else runs.push([e.start, e.length, e.depth]);
        }
        expect(runs).toEqual(v.map);
      } finally {
        t.cleanup();
      }
    });
  }

  /** base <- top, both with data; relative backing name. */
  function smallChain(dir: (n: string) => string, topOpts = 'cluster_size=64k'): { base: string; top: string } {
    const base = dir('base.qcow2');
    const top = dir('top.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', base, '16M');
    qemuIo(base, ['write -P 0x11 0 6M', 'write -P 0x12 8M 4M', 'write -z 2M 1M']);
    qemuImg('create', '-q', '-f', 'qcow2', '-o', topOpts, '-b', 'base.qcow2', '-F', 'qcow2', top);
    qemuIo(top, ['write -P 0x21 1M 1536k', 'write -P 0x22 9000000 70000', 'write -z 12M 64k', 'write -P 0x23 15M 4097']);
    return { base, top };
  }

  it('-u changes only the header, even with the old backing gone', async () => {
    const t = tempDir();
    try {
      const { base, top } = smallChain(t.path);
      const before = guestHash(top);
      const cs = 65536;
      const tail = fileHash(top, cs);
      const size = fileSize(top);
      renameSync(base, t.path('moved.qcow2'));
      await strataOk('rebase', '-u', '-b', 'moved.qcow2', '-F', 'qcow2', top);
      expect(fileSize(top)).toBe(size);
      expect(fileHash(top, cs)).toBe(tail);
      const info = qemuInfo(top);
      expect(info['backing-filename']).toBe('moved.qcow2');
      expect(info['backing-filename-format']).toBe('qcow2');
      expectClean(top);
      expect(guestHash(top)).toBe(before);
    } finally {
      t.cleanup();
    }
  });

  it("-b '' flattens into a standalone image with the same content", async () => {
    const t = tempDir();
    try {
      const { top } = smallChain(t.path);
      const before = guestHash(top);
      await strataOk('rebase', '-b', '', top);
      const info = qemuInfo(top);
      expect(info['backing-filename']).toBeUndefined();
      expect(info['full-backing-filename']).toBeUndefined();
      expectClean(top);
      expect(guestHash(top)).toBe(before);
      // Standalone for real: it reads the same with the old base gone.
      renameSync(t.path('base.qcow2'), t.path('gone.qcow2'));
      expect(guestHash(top)).toBe(before);
    } finally {
      t.cleanup();
    }
  });

  for (const topOpts of ['cluster_size=64k', 'cluster_size=32k,extended_l2=on', 'cluster_size=4k']) {
    it(`onto a backing outside the old chain with partly different content (${topOpts})`, async () => {
      const t = tempDir();
      try {
        const { base, top } = smallChain(t.path, topOpts);
        const other = t.path('other.qcow2');
        cpSparse(base, other);
        // Differences: changed data, data where base was zero/unallocated, zeros over base data,
        // some hidden by the top (1M..2.5M), some sub-cluster sized.
        qemuIo(other, ['write -P 0x51 512k 1M', 'write -P 0x52 7M 512k', 'write -z 8M 100000', 'write -P 0x53 3000 5', 'write -P 0x54 13M 2M', 'discard 4M 1M']);
        const before = guestHash(top);
        const otherBytes = fileHash(other);
        const baseBytes = fileHash(base);
        await strataOk('rebase', '-b', 'other.qcow2', '-F', 'qcow2', top);
        expect(qemuInfo(top)['backing-filename']).toBe('other.qcow2');
        expectClean(top);
        expect(guestHash(top)).toBe(before);
        expect(fileHash(other)).toBe(otherBytes);
        expect(fileHash(base)).toBe(baseBytes);
      } finally {
        t.cleanup();
      }
    });
  }

  it('onto a shorter backing outside the chain, and onto a raw one with -F raw', async () => {
    const t = tempDir();
    try {
      const { top } = smallChain(t.path);
      const before = guestHash(top);
      // 10 MiB: past its end the new backing reads as zero, where the old one had data (8M..12M).
      const short = t.path('short.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', short, '10M');
      qemuIo(short, ['write -P 0x11 0 6M', 'write -P 0x71 6M 1M', 'write -P 0x72 9M 1M']);
      await strataOk('rebase', '-b', 'short.qcow2', '-F', 'qcow2', top);
      expect(qemuInfo(top)['backing-filename']).toBe('short.qcow2');
      expectClean(top);
      expect(guestHash(top)).toBe(before);

      const raw = t.path('new.raw');
      qemuImg('create', '-q', '-f', 'raw', raw, '16M');
      qemuIo(raw, ['write -P 0x11 0 3M', 'write -P 0x73 12M 4M'], { format: 'raw' });
      await strataOk('rebase', '-b', 'new.raw', '-F', 'raw', top);
      const info = qemuInfo(top);
      expect([info['backing-filename'], info['backing-filename-format']]).toEqual(['new.raw', 'raw']);
      expectClean(top);
      expect(guestHash(top)).toBe(before);
    } finally {
      t.cleanup();
    }
  });

  it('relative backing names stay relative (resolved from the overlay, not the cwd)', async () => {
    const t = tempDir();
    try {
      mkdirSync(t.path('sub'));
      mkdirSync(t.path('imgs'));
      const base = t.path('imgs/base.qcow2');
      const top = t.path('imgs/top.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', base, '8M');
      qemuIo(base, ['write -P 0x61 0 4M']);
      qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top);
      qemuIo(top, ['write -P 0x62 1M 64k']);
      cpSparse(base, t.path('sub/copy.qcow2'));
      qemuIo(t.path('sub/copy.qcow2'), ['write -P 0x63 6M 1M']);
      const before = guestHash(top);

      expect(process.cwd()).not.toBe(t.path('imgs'));
      await strataOk('rebase', '-b', '../sub/copy.qcow2', '-F', 'qcow2', top);
      let info = qemuInfo(top);
      expect(info['backing-filename']).toBe('../sub/copy.qcow2');
      expect(info['full-backing-filename']).toBe(`${t.dir}/imgs/../sub/copy.qcow2`);
      expectClean(top);
      expect(guestHash(top)).toBe(before);

      await strataOk('rebase', '-u', '-b', 'base.qcow2', '-F', 'qcow2', top);
      info = qemuInfo(top);
      expect(info['backing-filename']).toBe('base.qcow2');
      expect(info['backing-filename-format']).toBe('qcow2');
      // Safe rebase back under a relative name: still relative, still the same content.
      await strataOk('rebase', '-b', '../sub/copy.qcow2', '-F', 'qcow2', top);
      info = qemuInfo(top);
      expect(info['backing-filename']).toBe('../sub/copy.qcow2');
      expectClean(top);
      expect(guestHash(top)).toBe(before);
    } finally {
      t.cleanup();
    }
  });
});

describeOracle('rebase never records a probed format (iotest 114)', () => {
  const t = tempDir('strata-rebase-noprobe-');
  afterAll(() => t.cleanup());

  for (const unsafe of [true, false]) {
    for (const kind of ['qcow2', 'raw'] as const) {
      it(`rebase ${unsafe ? '-u ' : ''}-b NEW (${kind}) without -F: refused as by qemu-img 7.2, overlay byte for byte unchanged`, async () => {
        const dir = t.path(`${unsafe ? 'u' : 's'}-${kind}`);
        mkdirSync(dir);
        const old = `${dir}/old.qcow2`;
        const top = `${dir}/top.qcow2`;
        const next = `${dir}/new.${kind}`;
        qemuImg('create', '-q', '-f', 'qcow2', old, '4M');
        qemuIo(old, ['write -P 0x11 0 4M']);
        qemuImg('create', '-q', '-f', kind, next, '4M');
        qemuImg('create', '-q', '-f', 'qcow2', '-b', 'old.qcow2', '-F', 'qcow2', top);
        qemuIo(top, ['write -P 0x22 1M 64k']);
        execFileSync('cp', [top, `${top}.qemu`]);
        const theirs = qemuImgRun('rebase', ...(unsafe ? ['-u'] : []), '-b', `new.${kind}`, `${top}.qemu`);
        expect(theirs.status).toBe(1);
        expect(theirs.stderr).toMatch(/backing format must be specified/);
        const before = fileHash(top);
        const r = await strata('rebase', ...(unsafe ? ['-u'] : []), '-b', `new.${kind}`, top);
        expect(r.code).toBe(1);
        expect(r.err).toMatch(/Could not change the backing file to 'new\.\w+': backing format must be specified/);
        expect(r.err.trim().split('\n')).toHaveLength(1);
        expect(fileHash(top)).toBe(before);
        expect(qemuInfo(top)['backing-filename-format']).toBe('qcow2');
      });
    }
  }
});
