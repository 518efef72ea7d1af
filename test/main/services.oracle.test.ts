// The app's services under plain Node with the fork job host, on folders built with qemu-img:
// the library service follows the folder, jobs run in their own processes through the
// protocol, a killed job process fails only its job, jobs on one chain take turns, a blocked
// plan is refused with the holder named, bad messages get error replies, history survives.
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { describeOracle, qemuImg, qemuIo, tempDir } from '../oracle/qemu';
import { startHolder } from '../oracle/holders';
import { ensureBuilt, repoRoot } from '../cli/run-cli';
import { expectClean, guestHash } from '../core/jobs/helpers';
import { AppServices } from '../../main/services/app-services';
import { ForkJobHost } from '../../main/services/job-host';
import { createDispatcher } from '../../main/services/rpc';
import { Library } from '../../core/library/library';
import type { JobRecord } from '../../core/protocol/jobs';
import type { LibrarySnapshot } from '../../core/library/types';
import { MAX_REQUEST_BYTES } from '../../core/protocol/rpc';
import { JOB_NICE } from '../../main/job-process/runner';

const MiB = 1 << 20;

function shape(s: LibrarySnapshot) {
  return s.images.map((i) => ({ path: i.path, backing: i.backing, children: i.children, problems: i.problems.map((p) => p.code), fixes: i.fixes.map((f) => f.command) }));
}

async function until<T>(what: string, fn: () => T | undefined | null | false, ms = 10_000): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = fn();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

describeOracle('app services (fork job host)', () => {
  const t = tempDir('strata-services-');
  const pool = join(t.dir, 'pool');
  const data = join(t.dir, 'data');
  let services: AppServices;
  let dispatch: ReturnType<typeof createDispatcher>;
  const events: { event: string; data: unknown; at: number }[] = [];
  const ask = async (method: string, params: unknown = {}) => {
    const r = await dispatch(JSON.stringify({ type: 'request', id: 1, method, params }), 100);
    if (!r.ok) throw Object.assign(new Error(r.error.message), { kind: r.error.kind });
    return r.result as never;
  };
  const jobEvents = (id: string) => events.filter((e) => e.event === 'job' && (e.data as JobRecord).id === id).map((e) => e.data as JobRecord);
  const finished = (id: string) => until(`job ${id} to end`, () => jobEvents(id).find((r) => ['succeeded', 'failed', 'cancelled'].includes(r.state)), 120_000);

  beforeAll(async () => {
    ensureBuilt();
    mkdirSync(pool, { recursive: true });
    qemuImg('create', '-q', '-f', 'qcow2', join(pool, 'base.qcow2'), '64M');
    qemuIo(join(pool, 'base.qcow2'), ['write -P 1 0 8M']);
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', join(pool, 'a.qcow2'));
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', join(pool, 'b.qcow2'));
    qemuIo(join(pool, 'a.qcow2'), ['write -P 2 1M 2M']);
    qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', 'gone.qcow2', '-F', 'qcow2', join(pool, 'orphan.qcow2'), '64M');
    // Random data compresses slowly: a job that runs for a few seconds.
    execFileSync('sh', ['-c', `head -c ${192 * MiB} /dev/urandom > ${join(t.dir, 'rand.bin')}`]);
    qemuImg('convert', '-f', 'raw', '-O', 'qcow2', join(t.dir, 'rand.bin'), join(pool, 'big.qcow2'));
    rmSync(join(t.dir, 'rand.bin'));
    services = await AppServices.create({
      dataDir: data, mode: 'browser', host: new ForkJobHost(join(repoRoot, 'bin', 'strata.cjs')), folders: [pool],
      libraryOptions: { debounceMs: 50, holdersEveryMs: 250 },
    });
    services.on((event, d) => events.push({ event, data: d, at: Date.now() }));
    dispatch = createDispatcher(services);
  });
  afterAll(async () => { await services?.close(); t.cleanup(); });

  it('the library service shows what a core scan of the folder shows', async () => {
    const snap = (await ask('library.get')) as LibrarySnapshot;
    expect(shape(snap)).toEqual(shape(await new Library([pool]).scan()));
    expect(snap.images.find((i) => i.path.endsWith('orphan.qcow2'))!.problems.map((p) => p.code)).toEqual(['backing-missing']);
  });

  it('images made, removed and rebased by qemu-img show up within a second', async () => {
    const latest = () => [...events].reverse().find((e) => e.event === 'library')?.data as LibrarySnapshot | undefined;
    const has = (name: string) => latest()?.images.some((i) => i.path === join(pool, name));
    let t0 = Date.now();
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'a.qcow2', '-F', 'qcow2', join(pool, 'c.qcow2'));
    await until('c.qcow2 to appear', () => has('c.qcow2'), 1000);
    expect(Date.now() - t0).toBeLessThan(1000);
    // A page opened now gets it too (library.get is the library as it stands).
    expect(((await ask('library.get')) as LibrarySnapshot).images.some((i) => i.path === join(pool, 'c.qcow2'))).toBe(true);
    expect(latest()!.images.find((i) => i.path === join(pool, 'a.qcow2'))!.children).toHaveLength(1);
    t0 = Date.now();
    execFileSync('qemu-img', ['rebase', '-u', '-b', 'base.qcow2', '-F', 'qcow2', join(pool, 'c.qcow2')]);
    await until('c.qcow2 to move under base', () => latest()?.images.find((i) => i.path === join(pool, 'base.qcow2'))!.children.length === 3, 1000);
    t0 = Date.now();
    rmSync(join(pool, 'c.qcow2'));
    await until('c.qcow2 to go', () => latest() && !has('c.qcow2'), 1000);
    expect(Date.now() - t0).toBeLessThan(1000);
    // A new folder is watched too (one inotify watch per folder).
    mkdirSync(join(pool, 'later'));
    await new Promise((r) => setTimeout(r, 200));
    t0 = Date.now();
    qemuImg('create', '-q', '-f', 'qcow2', '-b', '../base.qcow2', '-F', 'qcow2', join(pool, 'later', 'd.qcow2'));
    await until('later/d.qcow2 to appear', () => has('later/d.qcow2'), 1000);
    expect(Date.now() - t0).toBeLessThan(1000);
    rmSync(join(pool, 'later'), { recursive: true });
    await until('later/d.qcow2 to go', () => latest() && !has('later/d.qcow2'), 1000);
    expect(shape(latest()!)).toEqual(shape(await new Library([pool]).scan()));
    // A page opened now (library.get) sees the library as it stands, not the first scan's.
    expect(shape((await ask('library.get')) as LibrarySnapshot)).toEqual(shape(latest()!));
  });

  it('a convert started through the protocol streams progress and ends with a clean image', async () => {
    const out = join(t.dir, 'converted.qcow2');
    const plan = (await ask('jobs.plan', { spec: { op: 'convert', source: join(pool, 'a.qcow2'), target: out, targetFormat: 'qcow2' } })) as { creates: string[] };
    expect(plan.creates).toEqual([out]);
    const rec = (await ask('jobs.start', { spec: { op: 'convert', source: join(pool, 'a.qcow2'), target: out, targetFormat: 'qcow2', compress: true } })) as JobRecord;
    const end = await finished(rec.id);
    expect(end.state, end.error?.message).toBe('succeeded');
    expect(events.some((e) => e.event === 'progress' && (e.data as { id: string }).id === rec.id)).toBe(true);
    expectClean(out);
    expect(guestHash(out)).toBe(guestHash(join(pool, 'a.qcow2')));
  });

  it('SIGKILL of the job process fails that job with the reason; the service keeps answering', async () => {
    const rec = (await ask('jobs.start', { spec: { op: 'convert', source: join(pool, 'big.qcow2'), target: join(t.dir, 'killed.qcow2'), targetFormat: 'qcow2', compress: true } })) as JobRecord;
    const running = await until('the job to run', () => jobEvents(rec.id).find((r) => r.state === 'running'));
    expect(running.pid).toBeGreaterThan(0);
    expect(spawnSync('ps', ['-o', 'args=', '-p', String(running.pid)], { encoding: 'utf8' }).stdout).toContain('__job-process');
    // A running job gives way to the window on a busy machine.
    await until('the job process to lower its priority', () => Number(spawnSync('ps', ['-o', 'ni=', '-p', String(running.pid)], { encoding: 'utf8' }).stdout.trim()) === JOB_NICE || undefined);
    process.kill(running.pid!, 'SIGKILL');
    const end = await finished(rec.id);
    expect(end.state).toBe('failed');
    expect(end.error?.message).toContain('killed (SIGKILL)');
    const snap = (await ask('library.get')) as LibrarySnapshot;
    expect(snap.images.length).toBeGreaterThan(3);
  });

  it('two writing jobs on one chain run one after the other, and the second says what it waits for', async () => {
    const first = (await ask('jobs.start', { spec: { op: 'compact', image: join(pool, 'big.qcow2'), compress: true } })) as JobRecord;
    const second = (await ask('jobs.start', { spec: { op: 'snapshot', image: join(pool, 'big.qcow2'), action: 'create', name: 'after' } })) as JobRecord;
    const waiting = await until('the second to wait', () => jobEvents(second.id).find((r) => r.state === 'queued' && r.waitingFor));
    expect(waiting.waitingFor).toContain(first.title);
    const e1 = await finished(first.id);
    const e2 = await finished(second.id);
    expect([e1.state, e2.state]).toEqual(['succeeded', 'succeeded']);
    expect(e2.startedAt!).toBeGreaterThanOrEqual(e1.endedAt!);
    expectClean(join(pool, 'big.qcow2'));
    expect(qemuImg('snapshot', '-l', join(pool, 'big.qcow2'))).toContain('after');
  });

  it('a commit whose plan is blocked (image held by qemu-nbd) is refused with the holder named', async () => {
    const holder = await startHolder('qemu-nbd', join(pool, 'b.qcow2'), join(t.dir, 'nbd.sock'));
    try {
      const err = await ask('jobs.start', { spec: { op: 'commit', image: join(pool, 'b.qcow2') } }).catch((e: Error & { kind: string }) => e);
      expect(err).toBeInstanceOf(Error);
      expect((err as Error & { kind: string }).kind).toBe('in-use');
      expect((err as Error).message).toContain(`PID ${holder.pid}`);
      expect((err as Error).message).toContain('qemu-nbd');
    } finally {
      await holder.stop();
    }
  });

  it('malformed, unknown and oversized messages get error replies', async () => {
    const bad = [
      await dispatch('not json', 8),
      await dispatch(JSON.stringify({ type: 'request', id: 7, method: 'no.such', params: {} }), 60),
      await dispatch(JSON.stringify({ type: 'request', id: 8, method: 'jobs.start', params: { spec: { op: 'format-disk', image: '/' } } }), 60),
      await dispatch(JSON.stringify({ type: 'request', id: 9, method: 'library.addFolder', params: { path: 'a\0b' } }), 60),
      await dispatch(JSON.stringify({ type: 'request', id: 10, method: 'jobs.cancel', params: { id: 'x', extra: 1 } }), 60),
      await dispatch('x'.repeat(10), MAX_REQUEST_BYTES + 1),
      await dispatch({ type: 'request', id: -1 }, 10),
    ];
    for (const r of bad) expect(r.ok).toBe(false);
    expect(bad.map((r) => (r.ok ? '' : r.error.kind))).toEqual(['protocol', 'protocol', 'protocol', 'protocol', 'protocol', 'protocol', 'protocol']);
    expect(bad[1]!.id).toBe(7);
    expect(bad[1]!.ok ? '' : bad[1]!.error.message).toContain("unknown method 'no.such'");
    expect((await ask('library.get') as LibrarySnapshot).images.length).toBeGreaterThan(0);
  });

  it('the history survives a restart', async () => {
    const before = ((await ask('jobs.list')) as JobRecord[]).filter((j) => !['running', 'queued'].includes(j.state));
    expect(before.length).toBeGreaterThanOrEqual(3);
    const again = await AppServices.create({ dataDir: data, mode: 'browser', host: new ForkJobHost(join(repoRoot, 'bin', 'strata.cjs')), folders: [pool], libraryOptions: { holdersEveryMs: 0 } });
    try {
      const after = (await createDispatcher(again)(JSON.stringify({ type: 'request', id: 1, method: 'jobs.list', params: {} }), 60));
      expect(after.ok && (after.result as JobRecord[]).map((j) => [j.id, j.state, j.error?.message ?? null])).toEqual(before.map((j) => [j.id, j.state, j.error?.message ?? null]));
    } finally {
      await again.close();
    }
  });

  it('starts its spare job process only after the first scan, not beside it', async () => {
    const spawns: number[] = [];
    const fork = new ForkJobHost(join(repoRoot, 'bin', 'strata.cjs'));
    const host = { spawn: () => { spawns.push(Date.now()); return fork.spawn(); } };
    const s = await AppServices.create({ dataDir: join(t.dir, 'data-spare'), mode: 'browser', host, folders: [pool], libraryOptions: { holdersEveryMs: 0 } });
    try {
      expect(spawns, 'no job process while the library is scanned').toEqual([]);
      await s.library.ready();
      const scanned = Date.now();
      await until('the spare job process', () => spawns.length > 0, 15_000);
      expect(spawns).toHaveLength(1);
      expect(spawns[0]! - scanned).toBeGreaterThanOrEqual(900);
    } finally {
      await s.close();
    }
  });
});
