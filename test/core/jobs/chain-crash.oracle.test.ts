// Crash safety of rebase and commit on a real chain: the real CLI is SIGKILLed at random moments;
// afterwards every image passes qemu-img check with at most leaked clusters, and the chain (read
// through its top) holds exactly what it held before the job. A killed process loses nothing
// the kernel has: every write it completed stays in the page cache, so this sees process death,
// not write ordering (power cuts are failures.oracle.test.ts's crash cuts).
import { execFileSync, spawn } from 'node:child_process';
import { mkdirSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { describeOracle, qemuCheck, qemuImg, qemuIo, tempDir } from '../../oracle/qemu';
import { batches, guestHash, MiB, rng } from './helpers';
import { ensureBuilt } from '../../cli/run-cli';

const repoRoot = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
const SIZE = 256 * MiB;
/** Kills per job kind: a fixed number, whatever the machine's speed. */
const KILLS = 10;

interface Outcome { code: number | null; signal: NodeJS.Signals | null; ms: number; stderr: string }

/** Runs `node bin/strata.cjs ARGS` in `cwd`, SIGKILLing it after `killAfterMs` unless it ended. */
function runStrata(args: string[], cwd: string, killAfterMs?: number): Promise<Outcome> {
  return new Promise((resolve, reject) => {
    const t0 = Date.now();
    const child = spawn(process.execPath, [join(repoRoot, 'bin', 'strata.cjs'), ...args], {
      cwd, stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, STRATA_DEBUG: '1' },
    });
    let stderr = '';
    child.stderr!.on('data', (d: Buffer) => { stderr += d.toString(); });
    const timer = killAfterMs === undefined ? null : setTimeout(() => child.kill('SIGKILL'), killAfterMs);
    child.on('error', reject);
    child.on('exit', (code, signal) => {
      if (timer) clearTimeout(timer);
      resolve({ code, signal, ms: Date.now() - t0, stderr });
    });
  });
}

function cpSparse(from: string, to: string): void {
  execFileSync('cp', ['--sparse=always', from, to]);
}

describeOracle('rebase and commit survive SIGKILL at any moment', () => {
  const proto = tempDir('strata-chain-crash-');
  const files = ['base.qcow2', 'mid.qcow2', 'top.qcow2'];
  let expected = '';

  beforeAll(() => {
    ensureBuilt();
    const p = proto.path;
    qemuImg('create', '-q', '-f', 'qcow2', p('base.qcow2'), String(SIZE));
    qemuIo(p('base.qcow2'), ['write -P 0x11 0 64M', 'write -P 0x12 128M 16M', 'write -z 8M 4M']);
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', p('mid.qcow2'));
    qemuIo(p('mid.qcow2'), ['write -P 0x21 32M 48M', 'write -P 0x22 200M 8M', 'write -z 140M 2M']);
    // Scattered small writes: many separate differences for rebase to find and copy.
    const r = rng(31);
    const small: string[] = [];
    for (let i = 0; i < 600; i++) small.push(`write -P ${1 + (i % 250)} ${Math.floor(r() * (SIZE - 64 * 1024))} ${512 + Math.floor(r() * 8192)}`);
    for (const b of batches(small, 300)) qemuIo(p('mid.qcow2'), b);
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=64k', '-b', 'mid.qcow2', '-F', 'qcow2', p('top.qcow2'));
    qemuIo(p('top.qcow2'), ['write -P 0x31 60M 24M', 'write -P 0x32 150M 4M', 'write -z 36M 1M', 'write -P 0x33 250M 1000000']);
    expected = guestHash(p('top.qcow2'));
  });
  afterAll(() => proto.cleanup());

  function freshCopy(dir: string): void {
    mkdirSync(dir, { recursive: true });
    for (const f of files) cpSparse(proto.path(f), join(dir, f));
  }

  /** Every image checks clean but for leaks; the chain reads as before. */
  function verify(dir: string, what: string): { leaks: number } {
    let leaks = 0;
    for (const f of files) {
      const c = qemuCheck(join(dir, f));
      const j = c.json;
      expect({ what, f, status: c.status === 3 ? 0 : c.status, corruptions: j.corruptions ?? 0, errors: j['check-errors'] ?? 0 })
        .toEqual({ what, f, status: 0, corruptions: 0, errors: 0 });
      leaks += Number(j.leaks ?? 0);
    }
    expect({ what, content: guestHash(join(dir, 'top.qcow2')) }).toEqual({ what, content: expected });
    return { leaks };
  }

  for (const job of [
    { name: 'rebase', args: ['rebase', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'], seed: 41 },
    { name: 'commit', args: ['commit', 'top.qcow2'], seed: 42 },
  ]) {
    it(`${job.name}: ${KILLS} random SIGKILLs leave at most leaks and the same content`, async () => {
      const work = tempDir('strata-chain-crash-run-');
      try {
        // One uncrashed run first: it must succeed, and it tells how long the job takes.
        const clean = join(work.dir, 'clean');
        freshCopy(clean);
        const full = await runStrata(job.args, clean);
        expect({ code: full.code, stderr: full.stderr }).toEqual({ code: 0, stderr: '' });
        verify(clean, `${job.name} uncrashed`);
        const typical = full.ms;
        if (job.name === 'rebase') expect(qemuImg('info', '-U', join(clean, 'top.qcow2'))).toMatch(/backing file: base\.qcow2/);

        const r = rng(job.seed);
        const started = Date.now();
        const log: string[] = [];
        let done = 0;
        for (let i = 0; i < KILLS; i++) {
          const dir = join(work.dir, `kill-${i}`);
          freshCopy(dir);
          // Half the kills anywhere in the run, half late in it, where the short final steps
          // happen (rebase: the header switch; commit: emptying the overlay).
          const lo = i % 2 === 0 ? 20 : Math.max(20, 0.75 * typical);
          const hi = i % 2 === 0 ? typical : 1.05 * typical;
          const delay = Math.round(lo + r() * Math.max(0, hi - lo));
          const o = await runStrata(job.args, dir, delay);
          const finished = o.signal === null;
          if (finished) expect({ i, code: o.code, stderr: o.stderr }).toEqual({ i, code: 0, stderr: '' });
          const { leaks } = verify(dir, `${job.name} killed after ${delay} ms (#${i})`);
          // Where the kill landed: the backing name (rebase switches it last), the top's size
          // (commit shrinks it when emptying).
          const top = join(dir, 'top.qcow2');
          const phase = job.name === 'rebase'
            ? `backing ${/backing file: (\S+)/.exec(qemuImg('info', '-U', top))?.[1] ?? 'none'}`
            : `top ${statSync(top).size} B`;
          log.push(`${delay} ms: ${finished ? 'finished' : 'killed'}, ${phase}, ${leaks} leaked clusters`);
          done++;
          execFileSync('rm', ['-rf', dir]);
        }
        console.log(`[chain-crash ${job.name}] uncrashed run ${typical} ms; ${done} runs:\n  ${log.join('\n  ')}\n  loop ${Date.now() - started} ms`);
        expect(done).toBe(KILLS);
      } finally {
        work.cleanup();
      }
    }, 200_000);
  }
});
