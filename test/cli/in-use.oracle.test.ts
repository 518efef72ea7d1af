// "Never touch an image in use", end to end through the strata CLI: while qemu-io or qemu-nbd
// holds an image, every writing command is refused with a message naming the holder's PID and
// program and the files stay byte-identical; info/map and -U reads still work; reads that need
// consistent data are refused as qemu-img refuses them. While a strata commit runs, QEMU's own
// tools (and a second strata) are refused. The addon-less fallback (STRATA_NO_NATIVE=1) still
// refuses writes to an image QEMU holds, through /proc/locks.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { closeSync, existsSync, fstatSync, ftruncateSync, mkdirSync, openSync, readFileSync, readSync, statSync, writeSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { native } from '../../core/io/native';
import { qemuImg, qemuImgRun, qemuIo, tempDir, describeOracleText } from '../oracle/qemu';
import { lockBytes, poll, startHolder, type Holder } from '../oracle/holders';
import { ensureBuilt, strata, strataBin as runBin } from './run-cli';

const repoRoot = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const MiB = 1 << 20;
const WRITER_BYTES = [100, 101, 103, 201, 203];

// ---------------------------------------------------------------------------------------------
// Running strata

/** `node bin/strata.cjs ARGS` as a real process (with the addon unless `env` turns it off). */
function strataBin(args: string[], env: NodeJS.ProcessEnv = {}): { status: number | null; stdout: string; stderr: string } {
  return runBin(args, { env: { STRATA_NO_NATIVE: undefined, ...env } });
}

function sha256(file: string): string {
  return createHash('sha256').update(readFileSync(file)).digest('hex');
}

// ---------------------------------------------------------------------------------------------
// Holders and /proc


// ---------------------------------------------------------------------------------------------
// Fixtures

/** Makes cluster N (just past the end of the file) referenced by the refcounts only: one leak. */
function addLeak(file: string): void {
  const fd = openSync(file, 'r+');
  try {
    const h = Buffer.alloc(104);
    readSync(fd, h, 0, 104, 0);
    const cs = 2 ** h.readUInt32BE(20);
    if (h.readUInt32BE(96) !== 4) throw new Error('addLeak expects 16-bit refcounts');
    const e = Buffer.alloc(8);
    readSync(fd, e, 0, 8, Number(h.readBigUInt64BE(48)));
    const block = Number(e.readBigUInt64BE(0));
    const c = Math.ceil(fstatSync(fd).size / cs);
    ftruncateSync(fd, (c + 1) * cs);
    const v = Buffer.alloc(2);
    v.writeUInt16BE(1);
    writeSync(fd, v, 0, 2, block + c * 2);
  } finally {
    closeSync(fd);
  }
}

interface Fixture { dir: string; base: string; top: string; x: string; sock: string }

/**
 * base.qcow2 (64 MiB, 0x11 in [0, 1M)) <- top.qcow2 (0x22 in [1M, 2M), internal snapshot 'old',
 * one leaked cluster); x.qcow2 an unrelated empty 64 MiB image to rebase onto.
 */
function makeFixture(dir: string): Fixture {
  mkdirSync(dir, { recursive: true });
  const f = { dir, base: join(dir, 'base.qcow2'), top: join(dir, 'top.qcow2'), x: join(dir, 'x.qcow2'), sock: join(dir, 'nbd.sock') };
  qemuImg('create', '-q', '-f', 'qcow2', f.base, '64M');
  qemuIo(f.base, ['write -P 0x11 0 1M']);
  qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', f.top);
  qemuIo(f.top, ['write -P 0x22 1M 1M']);
  qemuImg('snapshot', '-c', 'old', f.top);
  qemuIo(f.top, ['write -P 0x33 2M 64k']);
  addLeak(f.top);
  qemuImg('create', '-q', '-f', 'qcow2', f.x, '64M');
  return f;
}

function hashes(f: Fixture): Record<string, string> {
  return { top: sha256(f.top), base: sha256(f.base), x: sha256(f.x) };
}

/** Every command here writes TOP (or its base): each must be refused while TOP is in use. */
const WRITERS: { name: string; args: (f: Fixture) => string[] }[] = [
  { name: 'commit', args: (f) => ['commit', f.top] },
  { name: 'commit -d', args: (f) => ['commit', '-d', f.top] },
  { name: 'rebase -b X', args: (f) => ['rebase', '-b', 'x.qcow2', '-F', 'qcow2', f.top] },
  { name: 'rebase -u -b X', args: (f) => ['rebase', '-u', '-b', 'x.qcow2', '-F', 'qcow2', f.top] },
  { name: 'rebase -b "" (flatten)', args: (f) => ['rebase', '-b', '', f.top] },
  { name: 'snapshot -c S', args: (f) => ['snapshot', '-c', 'S', f.top] },
  { name: 'snapshot -a old', args: (f) => ['snapshot', '-a', 'old', f.top] },
  { name: 'snapshot -d old', args: (f) => ['snapshot', '-d', 'old', f.top] },
  { name: 'check -r all', args: (f) => ['check', '-r', 'all', f.top] },
  { name: 'check -r leaks', args: (f) => ['check', '-r', 'leaks', f.top] },
  { name: 'resize +1M', args: (f) => ['resize', f.top, '+1M'] },
  { name: "io -c 'write 0 4k'", args: (f) => ['io', '-c', 'write 0 4k', f.top] },
  { name: "io -c 'write -z 0 64k'", args: (f) => ['io', '-c', 'write -z 0 64k', f.top] },
  { name: "io -c 'discard 1M 64k'", args: (f) => ['io', '-c', 'discard 1M 64k', f.top] },
];

/** The one-line refusal: says the image is in use and names the holder. */
function expectRefusal(r: { code: number | null; err: string }, file: string, holder: { pid: number; program: string }): void {
  expect(r.code, r.err).not.toBe(0);
  expect(r.err).toContain(`strata: ${file}: image is in use`);
  expect(r.err).toContain(`PID ${holder.pid} (${holder.program})`);
}

// ---------------------------------------------------------------------------------------------

describeOracleText('strata on an image held by QEMU', () => {
  const tmp = tempDir('strata-inuse-');
  beforeAll(() => ensureBuilt());
  afterAll(() => tmp.cleanup());

  it('has the native addon in this process (the in-process runs below use real OFD locks)', () => {
    expect(native()).not.toBeNull();
  });

  for (const kind of ['qemu-io', 'qemu-nbd'] as const) {
    describe(`held by ${kind}`, () => {
      let f: Fixture;
      let h: Holder;
      let before: Record<string, string>;
      beforeAll(async () => {
        f = makeFixture(tmp.path(kind));
        before = hashes(f);
        h = await startHolder(kind, f.top, f.sock);
      });
      afterAll(async () => { await h?.stop(); });

      // Each writer gets its own fixture and holder: one that wrongly writes cannot spoil the others.
      for (const w of WRITERS) {
        it(`strata ${w.name} exits non-zero naming PID and ${kind}, and no file changes`, async () => {
          const own = makeFixture(tmp.path(`${kind}-${w.name.replace(/[^a-z0-9]+/gi, '_')}`));
          const was = hashes(own);
          const holder = await startHolder(kind, own.top, own.sock);
          try {
            const r = await strata(...w.args(own));
            expectRefusal(r, own.top, holder);
            expect(r.out).toBe('');
            expect(hashes(own)).toEqual(was);
            expect(lockBytes(holder.pid, own.top)).toEqual(WRITER_BYTES); // the holder is undisturbed
          } finally {
            await holder.stop();
          }
        });
      }

      it('strata info and map work and agree with qemu-img -U', async () => {
        const info = await strata('info', '--output=json', f.top);
        expect(info.code, info.err).toBe(0);
        expect(JSON.parse(info.out)).toStrictEqual(JSON.parse(qemuImg('info', '-U', '--output=json', f.top)));
        const chain = await strata('info', '--output=json', '--backing-chain', f.top);
        expect(chain.code, chain.err).toBe(0);
        expect(JSON.parse(chain.out)).toStrictEqual(JSON.parse(qemuImg('info', '-U', '--output=json', '--backing-chain', f.top)));
        const human = await strata('info', f.top);
        expect(human.code, human.err).toBe(0);
        expect(human.out).toContain('virtual size: 64 MiB');
        const map = await strata('map', '--output=json', f.top);
        expect(map.code, map.err).toBe(0);
        expect(map.out).toBe(qemuImg('map', '-U', '--output=json', f.top));
        expect((await strata('map', f.top)).code).toBe(0);
        expect(hashes(f)).toEqual(before);
      });

      it('read-only commands with -U work: compare -U, convert -U -O raw, snapshot -l -U, check -U', async () => {
        const theirs = join(f.dir, 'qemu.raw');
        const ours = join(f.dir, 'strata.raw');
        qemuImg('convert', '-U', '-O', 'raw', f.top, theirs);
        const conv = await strata('convert', '-U', '-O', 'raw', f.top, ours);
        expect(conv.code, conv.err).toBe(0);
        expect(sha256(ours)).toBe(sha256(theirs));
        const cmp = await strata('compare', '-U', f.top, theirs);
        expect(cmp).toEqual({ code: 0, out: 'Images are identical.\n', err: '' });
        const snap = await strata('snapshot', '-l', '-U', f.top);
        expect(snap.code, snap.err).toBe(0);
        expect(snap.out).toBe(qemuImg('snapshot', '-l', '-U', f.top));
        expect(snap.out).toContain('old');
        const q = qemuImgRun('check', '-U', f.top);
        const chk = await strata('check', '-U', f.top);
        expect({ code: chk.code, out: chk.out }).toEqual({ code: q.status, out: q.stdout });
        expect(chk.code).toBe(3); // the leak is reported, not repaired
        expect(hashes(f)).toEqual(before);
      });

      // qemu-img 7.2 refuses these without -U ('Failed to get shared "write" lock'): they want
      // consistent reads and refuse to share write, which the holder uses.
      for (const [name, args, qargs] of [
        ['compare', (x: Fixture) => ['compare', x.top, x.x], (x: Fixture) => ['compare', x.top, x.x]],
        ['convert -O raw', (x: Fixture) => ['convert', '-O', 'raw', x.top, join(x.dir, 'c.raw')], (x: Fixture) => ['convert', '-O', 'raw', x.top, join(x.dir, 'q.raw')]],
        ['snapshot -l', (x: Fixture) => ['snapshot', '-l', x.top], (x: Fixture) => ['snapshot', '-l', x.top]],
        ['check', (x: Fixture) => ['check', x.top], (x: Fixture) => ['check', x.top]],
      ] as const) {
        it(`strata ${name} without -U is refused, as qemu-img ${name} is`, async () => {
          const q = qemuImgRun(...qargs(f));
          expect(q.status).not.toBe(0);
          expect(q.stderr).toContain('Failed to get shared "write" lock');
          const r = await strata(...args(f));
          expectRefusal(r, f.top, h);
          expect(r.err).toContain('Failed to get shared "write" lock');
          expect(hashes(f)).toEqual(before);
        });
      }

      it('the holder still works afterwards and its image checks clean apart from the leak', async () => {
        expect(hashes(f)).toEqual(before);
        const q = qemuImgRun('check', '-U', '--output=json', f.top);
        expect(JSON.parse(q.stdout)).toMatchObject({ leaks: 1 });
        expect(JSON.parse(q.stdout).corruptions ?? 0).toBe(0);
      });
    });
  }

  describe('an image in use elsewhere in the chain', () => {
    it('a writer on the BASE (a VM running on it): commit, flatten and writes to the top are refused, as by qemu-io', async () => {
      const f = makeFixture(tmp.path('base-held'));
      const was = hashes(f);
      const h = await startHolder('qemu-io', f.base, f.sock);
      try {
        // QEMU agrees: opening the top opens the base for consistent reads, which a writer forbids.
        const q = spawnSync('qemu-io', ['-c', 'write 0 4k', f.top], { encoding: 'utf8' });
        expect(q.stderr).toContain('Failed to get shared "write" lock');
        for (const args of [['commit', f.top], ['commit', '-d', f.top], ['rebase', '-b', '', f.top], ['io', '-c', 'write 0 4k', f.top]]) {
          const r = await strata(...args);
          expectRefusal(r, f.base, h);
          expect(hashes(f), args.join(' ')).toEqual(was);
        }
        expect((await strata('info', '--backing-chain', f.top)).code).toBe(0);
      } finally {
        await h.stop();
      }
    });

    it('a reader on the BASE (qemu-io -r): commit into it is refused, as qemu-img commit is; writes to the top work', async () => {
      const f = makeFixture(tmp.path('base-read'));
      const was = hashes(f);
      const h = await startHolder('qemu-io', f.base, f.sock, { readOnly: true });
      try {
        const q = qemuImgRun('commit', f.top);
        expect(q.status).not.toBe(0);
        expect(q.stderr).toContain('Failed to get "write" lock');
        expect(hashes(f)).toEqual(was);
        for (const args of [['commit', f.top], ['commit', '-d', f.top], ['commit', '-b', f.base, f.top]]) {
          const r = await strata(...args);
          expectRefusal(r, f.base, h);
          expect(hashes(f), args.join(' ')).toEqual(was);
        }
        // the top itself is free: writing it only reads the base, which a reader shares
        const w = await strata('io', '-c', 'write -P 0x77 0 4k', f.top);
        expect(w.code, w.err).toBe(0);
        expect(sha256(f.base)).toBe(was.base);
      } finally {
        await h.stop();
      }
    });

    it('a writer on the NEW backing file: rebase -b onto it is refused, as qemu-img rebase is', async () => {
      const f = makeFixture(tmp.path('x-held'));
      const was = hashes(f);
      const h = await startHolder('qemu-io', f.x, f.sock);
      try {
        const q = qemuImgRun('rebase', '-b', 'x.qcow2', '-F', 'qcow2', f.top);
        expect(q.status).not.toBe(0);
        expect(q.stderr).toContain('Failed to get shared "write" lock');
        expect(hashes(f)).toEqual(was);
        const r = await strata('rebase', '-b', 'x.qcow2', '-F', 'qcow2', f.top);
        expectRefusal(r, f.x, h);
        expect(hashes(f)).toEqual(was);
      } finally {
        await h.stop();
      }
    });
  });

  describe('the real binary (node bin/strata.cjs)', () => {
    let f: Fixture;
    let h: Holder;
    let before: Record<string, string>;
    beforeAll(async () => {
      f = makeFixture(tmp.path('bin'));
      before = hashes(f);
      h = await startHolder('qemu-io', f.top, f.sock);
    });
    afterAll(async () => { await h?.stop(); });

    it("io -c 'write 0 4k' exits 1 with one line on stderr naming the qemu-io PID", () => {
      const r = strataBin(['io', '-c', 'write 0 4k', f.top]);
      expect(r.stdout).toBe('');
      expect(r.stderr).toBe(`strata: ${f.top}: image is in use: Failed to get "write" lock; PID ${h.pid} (qemu-io) holds it. Stop the VM or process first (read-only commands work with -U)\n`);
      expect(r.status).toBe(1);
      expect(hashes(f)).toEqual(before);
    });

    it('commit, resize and check -r all exit non-zero and change nothing', () => {
      for (const args of [['commit', f.top], ['resize', f.top, '+1M'], ['check', '-r', 'all', f.top]]) {
        const r = strataBin(args);
        expectRefusal({ code: r.status, err: r.stderr }, f.top, h);
        expect(hashes(f), args.join(' ')).toEqual(before);
      }
    });

    it('info, map and convert -U work', () => {
      expect(strataBin(['info', f.top]).status).toBe(0);
      expect(strataBin(['map', f.top]).status).toBe(0);
      const out = join(f.dir, 'bin.raw');
      const r = strataBin(['convert', '-U', '-O', 'raw', f.top, out]);
      expect(r.stderr).toBe('');
      expect(r.status).toBe(0);
      qemuImg('convert', '-U', '-O', 'raw', f.top, join(f.dir, 'bin-q.raw'));
      expect(sha256(out)).toBe(sha256(join(f.dir, 'bin-q.raw')));
    });
  });

  describe('fallback without the addon (STRATA_NO_NATIVE=1, real binary): the /proc/locks check', () => {
    const env = { STRATA_NO_NATIVE: '1' };
    let f: Fixture;
    let h: Holder;
    let before: Record<string, string>;
    beforeAll(async () => {
      f = makeFixture(tmp.path('fallback'));
      before = hashes(f);
      h = await startHolder('qemu-io', f.top, f.sock);
    });
    afterAll(async () => { await h?.stop(); });

    for (const w of WRITERS.filter((x) => ['commit', 'snapshot -c S', 'resize +1M', "io -c 'write 0 4k'", 'rebase -b X', 'check -r all'].includes(x.name))) {
      it(`strata ${w.name} is still refused, with the same message naming PID and qemu-io`, async () => {
        const own = makeFixture(tmp.path(`fallback-${w.name.replace(/[^a-z0-9]+/gi, '_')}`));
        const was = hashes(own);
        const holder = await startHolder('qemu-io', own.top, own.sock);
        try {
          const r = strataBin(w.args(own), env);
          expectRefusal({ code: r.status, err: r.stderr }, own.top, holder);
          expect(r.stderr).toContain('Failed to get "write" lock');
          expect(hashes(own)).toEqual(was);
        } finally {
          await holder.stop();
        }
      });
    }

    it('with no holder, every writing command refuses, says how to build the addon, and changes nothing', () => {
      const own = makeFixture(tmp.path('fallback-unlocked'));
      const was = hashes(own);
      const cmds = [...WRITERS.map((w) => w.args(own)), ['create', '-f', 'qcow2', join(own.dir, 'new.qcow2'), '1M'], ['convert', '-O', 'qcow2', own.top, join(own.dir, 'out.qcow2')]];
      for (const args of cmds) {
        const r = strataBin(args, env);
        const what = args.join(' ');
        expect(r.status, what).toBe(1);
        expect(r.stderr.trim().split('\n'), what).toHaveLength(1);
        expect(r.stderr, what).toMatch(/^strata: \S+: cannot hold QEMU's image locks: the native addon is not available \(disabled by STRATA_NO_NATIVE=1\).*`npm rebuild` \(node-gyp needs python3, make and g\+\+\), or pass --force-unlocked/);
      }
      expect(hashes(own)).toEqual(was);
      expect(existsSync(join(own.dir, 'new.qcow2'))).toBe(false);
      expect(existsSync(join(own.dir, 'out.qcow2'))).toBe(false);
    });

    it('--force-unlocked writes anyway (before or after the command name)', () => {
      const own = makeFixture(tmp.path('fallback-forced'));
      expect(strataBin(['io', '--force-unlocked', '-c', 'write -P 0x66 0 64k', own.top], env).status).toBe(0);
      expect(strataBin(['--force-unlocked', 'commit', '-d', own.top], env)).toMatchObject({ status: 0, stderr: '' });
      expect(qemuImgRun('check', own.base).status).toBe(0);
      expect(strataBin(['io', '-c', 'read -P 0x66 0 64k', own.base], env).status).toBe(0);
      expect(strataBin(['--help'], env).stdout).toContain('--force-unlocked   write anyway, without locks. UNSAFE');
    });

    it('reads still work: info, map, compare -U, convert -U, snapshot -l -U; compare without -U is refused (exit 2)', () => {
      expect(strataBin(['info', f.top], env).status).toBe(0);
      expect(strataBin(['map', '--output=json', f.top], env).stdout).toBe(qemuImg('map', '-U', '--output=json', f.top));
      const theirs = join(f.dir, 'fb-q.raw');
      qemuImg('convert', '-U', '-O', 'raw', f.top, theirs);
      const ours = join(f.dir, 'fb.raw');
      // Writing the copy needs --force-unlocked without the addon; reading the source does not.
      expect(strataBin(['convert', '--force-unlocked', '-U', '-O', 'raw', f.top, ours], env).status).toBe(0);
      expect(sha256(ours)).toBe(sha256(theirs));
      expect(strataBin(['compare', '-U', f.top, theirs], env)).toMatchObject({ status: 0, stdout: 'Images are identical.\n' });
      expect(strataBin(['snapshot', '-l', '-U', f.top], env).stdout).toBe(qemuImg('snapshot', '-l', '-U', f.top));
      const c = strataBin(['compare', f.top, theirs], env);
      expect(c.status).toBe(2);
      expect(c.stderr).toBe(`strata: ${f.top}: image is in use: Failed to get shared "write" lock; PID ${h.pid} (qemu-io) holds it. Stop the VM or process first (read-only commands work with -U)\n`);
      expect(hashes(f)).toEqual(before);
    });

    // QEMU ignores flock() locks, and so does Strata's addon path (F_OFD_GETLK does not see
    // them); the /proc/locks fallback must not read a whole-file flock as QEMU's lock bytes.
    it('a flock() on an image (not a QEMU lock) blocks neither qemu-io nor strata, with or without the addon', async () => {
      const img = tmp.path('flocked.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', img, '16M');
      const py = spawn('python3', ['-c', [
        'import fcntl, os, sys',
        `fd = os.open(${JSON.stringify(img)}, os.O_RDONLY)`,
        'fcntl.flock(fd, fcntl.LOCK_SH)',
        'print("locked", flush=True)',
        'sys.stdin.read()',
      ].join('\n')], { stdio: ['pipe', 'pipe', 'inherit'] });
      try {
        await new Promise<void>((resolve, reject) => {
          py.stdout!.on('data', (d: Buffer) => { if (d.toString().includes('locked')) resolve(); });
          py.on('exit', (c) => reject(new Error(`python3 exited (${c})`)));
        });
        const q = spawnSync('qemu-io', ['-c', 'write -P 0x44 0 4k', img], { encoding: 'utf8' });
        expect(q.stderr).toBe('');
        expect((await strata('io', '-c', 'write -P 0x45 4k 4k', img)).code).toBe(0);
        const r = strataBin(['io', '--force-unlocked', '-c', 'write -P 0x46 8k 4k', img], env);
        expect(r.stderr).toBe('');
        expect(r.status).toBe(0);
      } finally {
        py.stdin!.end();
        await new Promise((r) => { if (py.exitCode !== null) r(null); else py.once('exit', r); });
      }
    });
  });

  describe('while a strata commit runs (real binary, 256 MiB to copy)', () => {
    let f: { dir: string; base: string; top: string };
    let child: ChildProcess | null = null;
    afterAll(() => { if (child && child.exitCode === null && child.signalCode === null) { child.kill('SIGCONT'); child.kill('SIGKILL'); } });

    it('QEMU\'s tools and a second strata are refused until it is done; the commit completes correctly', async () => {
      const dir = tmp.path('commit');
      mkdirSync(dir);
      f = { dir, base: join(dir, 'base.qcow2'), top: join(dir, 'top.qcow2') };
      qemuImg('create', '-q', '-f', 'qcow2', f.base, '512M');
      qemuIo(f.base, ['write -P 0x11 300M 1M']);
      qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', f.top);
      qemuIo(f.top, ['write -P 0x5a 0 256M']);
      const baseSize0 = statSync(f.base).size;

      const c = spawn(process.execPath, [join(repoRoot, 'bin', 'strata.cjs'), 'commit', f.top], {
        cwd: repoRoot, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, STRATA_DEBUG: undefined, STRATA_NO_NATIVE: undefined },
      });
      child = c;
      let out = '';
      let err = '';
      c.stdout!.on('data', (d: Buffer) => { out += d.toString(); });
      c.stderr!.on('data', (d: Buffer) => { err += d.toString(); });
      const exited = new Promise<number | null>((resolve) => c.once('exit', (code) => resolve(code)));
      const pid = c.pid!;
      // Started writing: it holds the write locks on the base and the base has grown.
      await poll(() => {
        if (c.exitCode !== null) throw new Error(`strata commit exited (${c.exitCode}) before it was seen writing: ${err}`);
        return lockBytes(pid, f.base).includes(101) && statSync(f.base).size > baseSize0 + 8 * MiB;
      }, 60_000, 'strata commit to start writing into the base');
      // Freeze it mid-copy so every check below runs while the job is in progress.
      process.kill(pid, 'SIGSTOP');
      try {
        expect(lockBytes(pid, f.top)).toEqual(WRITER_BYTES);
        expect(lockBytes(pid, f.base)).toEqual(WRITER_BYTES);

        const wTop = spawnSync('qemu-io', ['-c', 'write 0 4k', f.top], { encoding: 'utf8' });
        expect(wTop.status).not.toBe(0);
        expect(wTop.stderr).toContain('Failed to get "write" lock');
        const wBase = spawnSync('qemu-io', ['-c', 'write 0 4k', f.base], { encoding: 'utf8' });
        expect(wBase.status).not.toBe(0);
        expect(wBase.stderr).toContain('Failed to get "write" lock');
        const qc = qemuImgRun('commit', f.top);
        expect(qc.status).not.toBe(0);
        expect(qc.stderr).toContain('Failed to get "write" lock');
        const rBase = spawnSync('qemu-io', ['-r', '-c', 'read 0 4k', f.base], { encoding: 'utf8' });
        expect(rBase.status).not.toBe(0);
        expect(rBase.stderr).toContain('Failed to get shared "write" lock');

        // A second strata writer, in this (another) process, is refused and names the job's
        // process (node running Strata is named as Strata).
        const strataHolder = { pid, program: 'strata' };
        expectRefusal(await strata('io', '-c', 'write 0 4k', f.top), f.top, strataHolder);
        expectRefusal(await strata('io', '-c', 'write 0 4k', f.base), f.base, strataHolder);
        expectRefusal(await strata('commit', f.top), f.top, strataHolder);
        expectRefusal(await strata('resize', f.base, '+1M'), f.base, strataHolder);
        expect(c.exitCode).toBeNull();
      } finally {
        process.kill(pid, 'SIGCONT');
      }
      const code = await exited;
      expect({ code, out, err }).toEqual({ code: 0, out: 'Image committed.\n', err: '' });

      // Nothing from the refused writers got in: the base holds the top's data, the top is empty.
      for (const img of [f.base, f.top]) expect(qemuImgRun('check', img).status, img).toBe(0);
      const read = spawnSync('qemu-io', ['-r', '-c', 'read -P 0x5a 0 256M', '-c', 'read -P 0x11 300M 1M', f.base], { encoding: 'utf8' });
      expect(read.stdout).not.toMatch(/fail/i);
      expect(read.stderr).toBe('');
      const map = JSON.parse(qemuImg('map', '--output=json', f.top)) as { depth: number; data: boolean }[];
      expect(map.filter((e) => e.depth === 0 && e.data)).toEqual([]);
      expect(qemuImgRun('compare', f.top, f.base).status).toBe(0);
    });
  });
});
