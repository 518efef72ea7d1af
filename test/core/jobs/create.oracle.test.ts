// strata create against qemu-img create 7.2: same bytes on disk for every plain layout
// (header with its extensions, refcount table and blocks, L1 table, at the same offsets),
// the same `qemu-img info`, a clean `qemu-img check`, images qemu-io can write and read,
// SIZE from the backing file, and one-line errors that leave files alone.
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, statSync, writeFileSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, expect, expect as globalExpect, it, type ExpectStatic } from 'vitest';
import { strata } from '../../cli/run-cli';
import { parseCreateOptions } from '../../../core/jobs/create';
import { qemuCheck, qemuImg, qemuImgRun, qemuIo, tempDir, describeOracleText } from '../../oracle/qemu';

const MiB = 2 ** 20;
const GiB = 2 ** 30;
const TiB = 2 ** 40;

/** qemu-img info --output=json without the fields that legitimately differ. */
function info(file: string): Record<string, unknown> {
  const j = JSON.parse(qemuImg('info', '--output=json', file)) as Record<string, unknown>;
  delete j['actual-size'];
  delete j['filename'];
  return j;
}

/** First differing byte of two files (-1 if identical), reading holes cheaply via cmp. */
function firstDifference(a: string, b: string): { offset: number; sizeA: number; sizeB: number } {
  const sizeA = statSync(a).size;
  const sizeB = statSync(b).size;
  const r = spawnSync('cmp', [a, b], { encoding: 'utf8' });
  if (r.status === 0) return { offset: -1, sizeA, sizeB };
  const m = /differ: (?:byte|char) (\d+)/.exec(r.stdout);
  return { offset: m ? Number(m[1]) - 1 : Math.min(sizeA, sizeB), sizeA, sizeB };
}

function describeDiff(a: string, b: string, clusterSize: number): string {
  const d = firstDifference(a, b);
  if (d.offset < 0) return 'identical';
  return `differ at byte 0x${d.offset.toString(16)} (cluster ${Math.floor(d.offset / clusterSize)}, +0x${(d.offset % clusterSize).toString(16)}); sizes ${d.sizeA} vs ${d.sizeB}`;
}

function expectClean(file: string, expect: ExpectStatic = globalExpect): void {
  const c = qemuCheck(file);
  expect(c.status, JSON.stringify(c.json)).toBe(0);
  expect(c.json['corruptions'] ?? 0).toBe(0);
  expect(c.json['leaks'] ?? 0).toBe(0);
  expect(c.json['check-errors'] ?? 0).toBe(0);
}

interface Case {
  name: string;
  o?: string;
  size: number;
  /** extra arguments (backing) for both tools */
  extra?: string[];
  clusterSize?: number;
}

const sizes = [0, MiB, 10 * GiB, TiB];
const cases: Case[] = [];
for (const cs of [512, 4096, 65536, 2 * MiB]) {
  for (const size of sizes) {
    if (cs === 512 && size === TiB) continue; // too large for 512-byte clusters (an error case below)
    cases.push({ name: `cluster_size=${cs} size=${size}`, o: `cluster_size=${cs}`, size, clusterSize: cs });
  }
}
cases.push(
  { name: 'default options, 1M', size: MiB },
  { name: 'unaligned size 1000 (rounded to 1024)', size: 1000 },
  { name: '512-byte clusters, 64G (refcount table grows)', o: 'cluster_size=512', size: 64 * GiB, clusterSize: 512 },
  { name: '1k clusters, 64-bit refcounts, 128G', o: 'cluster_size=1k,refcount_bits=64', size: 128 * GiB, clusterSize: 1024 },
  { name: 'extended_l2 64k', o: 'extended_l2=on', size: 10 * GiB },
  { name: 'extended_l2 16k 1T', o: 'extended_l2=on,cluster_size=16k', size: TiB, clusterSize: 16384 },
  { name: 'extended_l2 2M 1T', o: 'extended_l2=on,cluster_size=2M', size: TiB, clusterSize: 2 * MiB },
  { name: 'compat=0.10', o: 'compat=0.10', size: 10 * GiB },
  { name: 'compat=v2 512-byte clusters', o: 'compat=v2,cluster_size=512', size: 10 * GiB, clusterSize: 512 },
  { name: 'compat=v3', o: 'compat=v3', size: MiB },
  { name: 'refcount_bits=1', o: 'refcount_bits=1', size: 10 * GiB },
  { name: 'refcount_bits=1 512-byte clusters 64G', o: 'refcount_bits=1,cluster_size=512', size: 64 * GiB, clusterSize: 512 },
  { name: 'refcount_bits=64', o: 'refcount_bits=64', size: TiB },
  { name: 'refcount_bits=64 4k', o: 'refcount_bits=64,cluster_size=4k', size: TiB, clusterSize: 4096 },
  { name: 'refcount_bits=8', o: 'refcount_bits=8', size: MiB },
  { name: 'compression_type=zstd', o: 'compression_type=zstd', size: 10 * GiB },
  { name: 'lazy_refcounts=on', o: 'lazy_refcounts=on', size: 10 * GiB },
  { name: 'everything v3 at once', o: 'lazy_refcounts=on,compression_type=zstd,extended_l2=on,refcount_bits=32,cluster_size=128k', size: TiB, clusterSize: 128 * 1024 },
  { name: 'qcow2 backing with -F', size: 10 * GiB, extra: ['-b', 'base.qcow2', '-F', 'qcow2'] },
  { name: 'raw backing with -F', size: 10 * GiB, extra: ['-b', 'base.raw', '-F', 'raw'] },
  { name: 'qcow2 backing, compat=0.10', o: 'compat=0.10', size: MiB, extra: ['-b', 'base.qcow2', '-F', 'qcow2'] },
  { name: 'qcow2 backing, 512-byte clusters (no feature table)', o: 'cluster_size=512', size: MiB, extra: ['-b', 'base.qcow2', '-F', 'qcow2'], clusterSize: 512 },
  { name: 'backing via -o backing_file/backing_fmt', o: 'backing_file=base.qcow2,backing_fmt=qcow2', size: MiB },
  { name: 'absolute backing name', size: MiB, extra: ['-b', '@DIR@/base.qcow2', '-F', 'qcow2'] },
  { name: 'preallocation=off', o: 'preallocation=off', size: MiB },
);

const preallocCases: Case[] = [
  { name: 'preallocation=metadata 64M', o: 'preallocation=metadata', size: 64 * MiB },
  { name: 'preallocation=metadata 1G', o: 'preallocation=metadata', size: GiB },
  { name: 'preallocation=metadata 64M, 4k clusters', o: 'preallocation=metadata,cluster_size=4k', size: 64 * MiB, clusterSize: 4096 },
  { name: 'preallocation=metadata 16M, 512-byte clusters (refcount table grows twice)', o: 'preallocation=metadata,cluster_size=512', size: 16 * MiB, clusterSize: 512 },
  { name: 'preallocation=metadata 64M, extended_l2', o: 'preallocation=metadata,extended_l2=on', size: 64 * MiB },
  { name: 'preallocation=metadata 64M, refcount_bits=1, 2M clusters', o: 'preallocation=metadata,refcount_bits=1,cluster_size=2M', size: 64 * MiB, clusterSize: 2 * MiB },
  { name: 'preallocation=metadata unaligned 1000 bytes', o: 'preallocation=metadata', size: 1000 },
  { name: 'preallocation=metadata 64M with qcow2 backing (extended_l2)', o: 'preallocation=metadata,extended_l2=on', size: 64 * MiB, extra: ['-b', 'base.qcow2', '-F', 'qcow2'] },
];

describeOracleText('strata create (oracle: qemu-img create 7.2)', () => {
  const t = tempDir('strata-create-');
  const report: string[] = [];
  const sub = (name: string) => join(t.dir, name);

  beforeAll(() => {
    qemuImg('create', '-q', '-f', 'qcow2', sub('base.qcow2'), String(3 * GiB + 512));
    qemuIo(sub('base.qcow2'), ['write -P 0x5a 0 1M']);
    writeFileSync(sub('base.raw'), Buffer.alloc(0));
    spawnSync('truncate', ['-s', String(5 * MiB + 1000), sub('base.raw')]);
  });
  afterAll(() => {
    if (report.length) process.stderr.write(`\ncreate: layouts that differ from qemu-img:\n${report.join('\n')}\n`);
    t.cleanup();
  });

  // Each case runs qemu-img several times: run them side by side (with the test's own expect).
  const runCase = async (c: Case, id: string, expect: ExpectStatic) => {
    const ours = sub(`ours-${id}.qcow2`);
    const theirs = sub(`qemu-${id}.qcow2`);
    const extra = (c.extra ?? []).map((a) => a.replace('@DIR@', t.dir));
    // Relative backing names are relative to the new image: run both tools from elsewhere.
    const opt = c.o ? ['-o', c.o] : [];
    const r = await strata('create', '-q', '-f', 'qcow2', ...opt, ...extra, ours, String(c.size));
    expect(r.err).toBe('');
    expect(r.code).toBe(0);
    expect(r.out).toBe('');
    qemuImg('create', '-q', '-f', 'qcow2', ...opt, ...extra, theirs, String(c.size));

    expectClean(ours, expect);
    expect(info(ours)).toEqual(info(theirs));

    // Byte for byte, the whole file: header and extensions, refcount table and blocks, L1
    // (and with preallocation every L2 table and the file length) where qemu-img puts them.
    const diff = describeDiff(ours, theirs, c.clusterSize ?? 65536);
    if (diff !== 'identical') report.push(`  ${c.name}: ${diff}`);
    expect(diff).toBe('identical');

    if (c.size >= MiB) {
      qemuIo(ours, ['write -P 0x11 0 1M', 'read -P 0x11 0 1M']);
      if (c.size > 2 * MiB) qemuIo(ours, [`write -P 0x22 ${c.size - MiB} 1M`, `read -P 0x22 ${c.size - MiB} 1M`]);
      expectClean(ours, expect);
    }
  };

  cases.forEach((c, i) => it.concurrent(`plain layout: ${c.name}`, ({ expect }) => runCase(c, `plain${i}`, expect)));
  preallocCases.forEach((c, i) => it.concurrent(`metadata preallocation: ${c.name}`, ({ expect }) => runCase(c, `prealloc${i}`, expect)));

  it('prints the same "Formatting" line as qemu-img', async () => {
    for (const args of [
      ['-f', 'qcow2', '@F@', '1M'],
      ['-f', 'qcow2', '-o', 'compat=1.1,preallocation=off,lazy_refcounts=on,extended_l2=on,compression_type=zstd,refcount_bits=64,cluster_size=128k', '@F@', '1G'],
      ['-f', 'qcow2', '-o', 'compat=v2', '-b', 'base.qcow2', '-F', 'qcow2', '@F@'],
      ['-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', '@F@'],
      ['-f', 'raw', '@F@', '1000'],
      ['-f', 'raw', '-o', 'preallocation=off', '@F@', '1M'],
    ]) {
      const f = sub('fmt-line.img');
      const ours = await strata('create', ...args.map((a) => (a === '@F@' ? f : a)));
      expect(ours.code, ours.err).toBe(0);
      const theirs = qemuImgRun('create', ...args.map((a) => (a === '@F@' ? f : a)));
      expect(theirs.status).toBe(0);
      expect(ours.out).toBe(theirs.stdout);
    }
  });

  it('SIZE defaults to the backing file size (qcow2 and raw, rounded up to 512 as qemu-img does)', async () => {
    for (const [base, fmt] of [['base.qcow2', 'qcow2'], ['base.raw', 'raw']] as const) {
      const ours = sub(`nosize-ours-${fmt}.qcow2`);
      const theirs = sub(`nosize-qemu-${fmt}.qcow2`);
      const r = await strata('create', '-q', '-f', 'qcow2', '-b', base, '-F', fmt, ours);
      expect(r.code, r.err).toBe(0);
      qemuImg('create', '-q', '-f', 'qcow2', '-b', base, '-F', fmt, theirs);
      expect(info(ours)).toEqual(info(theirs));
      expect(describeDiff(ours, theirs, 65536)).toBe('identical');
      expectClean(ours);
      const j = JSON.parse(qemuImg('info', '--output=json', ours)) as Record<string, unknown>;
      expect(j['virtual-size']).toBe(fmt === 'qcow2' ? 3 * GiB + 512 : 5 * MiB + 1024);
      expect(j['backing-filename']).toBe(base);
      // reads through to the backing file
      if (fmt === 'qcow2') qemuIo(ours, ['read -P 0x5a 0 1M']);
    }
  });

  it('keeps a relative backing name relative, resolved from the new image\'s directory', async () => {
    mkdirSync(sub('nested/deeper'), { recursive: true });
    const ours = sub('nested/deeper/top.qcow2');
    const theirs = sub('nested/deeper/top-qemu.qcow2');
    const r = await strata('create', '-q', '-f', 'qcow2', '-b', '../../base.qcow2', '-F', 'qcow2', ours);
    expect(r.code, r.err).toBe(0);
    qemuImg('create', '-q', '-f', 'qcow2', '-b', '../../base.qcow2', '-F', 'qcow2', theirs);
    expect(describeDiff(ours, theirs, 65536)).toBe('identical');
    const j = JSON.parse(qemuImg('info', '--output=json', ours)) as Record<string, unknown>;
    expect(j['backing-filename']).toBe('../../base.qcow2');
    expect(j['virtual-size']).toBe(3 * GiB + 512);
    qemuIo(ours, ['read -P 0x5a 0 1M']);
  });

  it('-u records a backing file that does not exist (SIZE required)', async () => {
    const ours = sub('unsafe-ours.qcow2');
    const theirs = sub('unsafe-qemu.qcow2');
    const r = await strata('create', '-q', '-f', 'qcow2', '-u', '-b', 'missing.qcow2', '-F', 'qcow2', ours, '1G');
    expect(r.code, r.err).toBe(0);
    qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', 'missing.qcow2', '-F', 'qcow2', theirs, '1G');
    expect(describeDiff(ours, theirs, 65536)).toBe('identical');
  });

  it('raw: a sparse file of SIZE (rounded up to 512), truncating an existing file', async () => {
    const ours = sub('ours.raw');
    writeFileSync(ours, Buffer.alloc(3 * MiB, 0x77));
    const r = await strata('create', '-q', '-f', 'raw', ours, '1000');
    expect(r.code, r.err).toBe(0);
    expect(statSync(ours).size).toBe(1024);
    expect(readFileSync(ours).every((b) => b === 0)).toBe(true);
    const big = sub('big.raw');
    expect((await strata('create', '-q', '-f', 'raw', big, '10G')).code).toBe(0);
    expect(statSync(big).size).toBe(10 * GiB);
    // Sparse but for its first block, as qemu-img's (its file driver writes it when growing an
    // empty file; measure counts it).
    const theirs = sub('theirs.raw');
    qemuImg('create', '-q', '-f', 'raw', theirs, '10G');
    expect(statSync(big).blocks).toBe(statSync(theirs).blocks);
    expect(statSync(big).blocks).toBeLessThanOrEqual(8);
    expect(info(big)).toMatchObject({ 'virtual-size': 10 * GiB, format: 'raw' });
    qemuIo(big, ['write -P 0x33 5G 1M', 'read -P 0x33 5G 1M'], { format: 'raw' });
  });

  it('overwrites an existing image as qemu-img does (truncate, then a fresh layout)', async () => {
    const f = sub('overwrite.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata', f, '256M');
    qemuIo(f, ['write -P 0x44 0 4M']);
    const r = await strata('create', '-q', '-f', 'qcow2', f, '1G');
    expect(r.code, r.err).toBe(0);
    const ref = sub('overwrite-ref.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', ref, '1G');
    expect(describeDiff(f, ref, 65536)).toBe('identical');
    expectClean(f);
  });

  it('refuses to touch an image a QEMU process holds', async () => {
    const f = sub('held.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', f, '64M');
    const before = readFileSync(f);
    const child = spawn('qemu-io', [f], { stdio: ['pipe', 'pipe', 'pipe'] });
    child.stdout!.resume();
    child.stderr!.resume();
    try {
      // wait until qemu-io has the image open and locked
      const deadline = Date.now() + 10_000;
      while (Date.now() < deadline) {
        const held = qemuImgRun('info', f);
        if (held.status !== 0) break;
        await new Promise((res) => setTimeout(res, 50));
      }
      const r = await strata('create', '-f', 'qcow2', f, '1G');
      expect(r.code).not.toBe(0);
      expect(r.err.trim().split('\n')).toHaveLength(1);
      expect(r.err).toMatch(/in use/);
      expect(readFileSync(f).equals(before)).toBe(true);
    } finally {
      child.stdin!.end('quit\n');
      await new Promise((res) => child.once('exit', res));
    }
  });

  /** qemuAccepts: cases where strata is deliberately stricter than qemu-img. */
  const errorCases: Array<{ args: string[]; match: RegExp; qemuAccepts?: boolean }> = [
    { args: ['-f', 'qcow2', '-o', 'cluster_size=1000', '@F@', '1M'], match: /cluster size/ },
    { args: ['-f', 'qcow2', '-o', 'cluster_size=256', '@F@', '1M'], match: /cluster size/ },
    { args: ['-f', 'qcow2', '-o', 'cluster_size=4M', '@F@', '1M'], match: /cluster size/ },
    { args: ['-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=8k', '@F@', '1M'], match: /extended_l2.*16k/ },
    { args: ['-f', 'qcow2', '-o', 'compat=0.10,lazy_refcounts=on', '@F@', '1M'], match: /lazy_refcounts.*compat=1\.1/ },
    { args: ['-f', 'qcow2', '-o', 'compat=0.10,extended_l2=on', '@F@', '1M'], match: /extended_l2.*compat=1\.1/ },
    { args: ['-f', 'qcow2', '-o', 'compat=0.10,compression_type=zstd', '@F@', '1M'], match: /zstd.*compat=1\.1/ },
    { args: ['-f', 'qcow2', '-o', 'compat=0.10,refcount_bits=8', '@F@', '1M'], match: /refcount_bits=8.*compat=1\.1/ },
    { args: ['-f', 'qcow2', '-o', 'refcount_bits=3', '@F@', '1M'], match: /refcount_bits/ },
    { args: ['-f', 'qcow2', '-o', 'refcount_bits=128', '@F@', '1M'], match: /refcount_bits/ },
    { args: ['-f', 'qcow2', '-o', 'compat=1.2', '@F@', '1M'], match: /compat/ },
    { args: ['-f', 'qcow2', '-o', 'compression_type=lz4', '@F@', '1M'], match: /compression_type/ },
    { args: ['-f', 'qcow2', '-o', 'lazy_refcounts=maybe', '@F@', '1M'], match: /lazy_refcounts/ },
    { args: ['-f', 'qcow2', '-o', 'preallocation=sparse', '@F@', '1M'], match: /sparse/ },
    { args: ['-f', 'qcow2', '-o', 'foo=bar', '@F@', '1M'], match: /unknown option 'foo'/ },
    { args: ['-f', 'raw', '-o', 'preallocation=metadata', '@F@', '1M'], match: /Unsupported preallocation mode: metadata/ },
    { args: ['-f', 'raw', '-o', 'cluster_size=4k', '@F@', '1M'], match: /cluster_size.*qcow2/ },
    { args: ['-f', 'raw', '-b', 'base.raw', '-F', 'raw', '@F@', '1M'], match: /backing file/ },
    { args: ['-f', 'bogus', '@F@', '1M'], match: /unknown format/ },
    { args: ['-f', 'qcow2', '@F@'], match: /SIZE/ },
    { args: ['-f', 'qcow2', '@F@', '1Q'], match: /size/ },
    { args: ['-f', 'qcow2', '-o', 'cluster_size=512', '@F@', '1T'], match: /too large/ },
    { args: ['-f', 'qcow2', '-o', 'cluster_size=512', '@F@', String(128 * GiB + 512)], match: /too large/ },
    { args: ['-f', 'qcow2', '-b', '@DIR@/missing.qcow2', '-F', 'qcow2', '@F@'], match: /does not exist/ },
    { args: ['-f', 'qcow2', '-b', 'missing.qcow2', '-F', 'qcow2', '@F@', '1M'], match: /does not exist/ },
    // qemu-img 7.2's words, and what it detected (never recorded: iotest 114).
    { args: ['-f', 'qcow2', '-b', '@DIR@/base.qcow2', '@F@', '1M'], match: /Backing file specified without backing format.*\nDetected format of qcow2\./ },
    { args: ['-f', 'qcow2', '-u', '-b', 'missing.qcow2', '@F@', '1M'], match: /Backing file specified without backing format/ },
    { args: ['-f', 'qcow2', '-u', '-b', 'missing.qcow2', '-F', 'qcow2', '@F@'], match: /SIZE is needed with -u/ },
    { args: ['-f', 'qcow2', '-F', 'qcow2', '@F@', '1M'], match: /needs a backing file/ },
    { args: ['-f', 'qcow2', '-o', 'preallocation=metadata', '-b', 'base.qcow2', '-F', 'qcow2', '@F@', '1M'], match: /preallocation=metadata with a backing file needs extended_l2=on/ },
    { args: ['-f', 'qcow2', '-b', '@F@', '-F', 'qcow2', '@F@', '1M'], match: /is the image being created/ },
    { args: ['-f', 'qcow2', '-b', 'err-target.qcow2', '-F', 'qcow2', '@F@', '1M'], match: /is the image being created/ },
    { args: ['-f', 'qcow2', '-b', '@DIR@/base.raw', '-F', 'qcow2', '@F@', '1M'], match: /cannot open backing file.*qcow2/ },
    { args: ['-f', 'qcow2', '-o', 'cluster_size=512', '-u', '-b', 'x'.repeat(600), '-F', 'qcow2', '@F@', '1M'], match: /do not fit|too long/ },
    { args: ['-f', 'qcow2', '-u', '-b', 'x'.repeat(1100), '-F', 'qcow2', '@F@', '1M'], match: /too long/ },
  ];
  for (const e of errorCases) {
    it(`error: ${e.args.map((a) => (a.length > 40 ? `${a.slice(0, 8)}…(${a.length})` : a)).join(' ')}`, async () => {
      const target = sub('err-target.qcow2');
      const args = e.args.map((a) => a.replace('@F@', target).replace('@DIR@', t.dir));
      // An existing file must survive a refused create untouched.
      const sentinel = Buffer.from('keep me');
      writeFileSync(target, sentinel);
      const r = await strata('create', ...args);
      expect(r.code).not.toBe(0);
      expect(r.out).toBe('');
      const lines = r.err.trim().split('\n');
      expect(lines.length, r.err).toBeLessThanOrEqual(2); // the message (and, for syntax errors, the usage line)
      expect(lines[0]).toMatch(/^strata: /);
      expect(r.err).toMatch(e.match);
      expect(readFileSync(target).equals(sentinel)).toBe(true);
      // qemu-img refuses too
      if (!e.qemuAccepts) {
        const q = qemuImgRun('create', '-q', ...args);
        expect(q.status, `qemu-img accepted: ${args.join(' ')}`).not.toBe(0);
      }
    });
  }

  it('a refused create does not leave a new file behind', async () => {
    const f = sub('never.qcow2');
    const r = await strata('create', '-f', 'qcow2', '-o', 'cluster_size=1000', f, '1M');
    expect(r.code).not.toBe(0);
    expect(existsSync(f)).toBe(false);
  });
});

it('parseCreateOptions: qemu option syntax', () => {
  expect(parseCreateOptions('cluster_size=4k,compat=v2,lazy_refcounts=off,refcount_bits=16')).toMatchObject({ clusterSize: 4096, compat: '0.10', lazyRefcounts: false, refcountBits: 16 });
  expect(parseCreateOptions('backing_file=a,,b.qcow2,backing_fmt=raw')).toMatchObject({ backingFile: 'a,b.qcow2', backingFormat: 'raw' });
  expect(parseCreateOptions('compat=1.1,compat=0.10').compat).toBe('0.10');
  expect(parseCreateOptions('extended_l2=on,compression_type=zstd,preallocation=metadata,size=1.5G')).toMatchObject({ extendedL2: true, compressionType: 'zstd', preallocation: 'metadata', size: 1.5 * GiB });
  expect(() => parseCreateOptions('cluster_size')).toThrow(/needs a value/);
});
