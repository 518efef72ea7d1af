// Drives one writing command (the real CLI, in this process) through injected faults and
// simulated crashes, and judges every outcome by the same rules:
//   - every qcow2 image there opens, and qemu-img check finds no corruption (leaks allowed);
//   - content reads as the case says: a job's result as before or as after the job, never a
//     mix; a source as before; guest writes anywhere outside their ranges as before;
//   - a command that met a fault failed (nothing reports success after a failed write), with
//     one line on stderr naming the file and the cause; one that met none succeeded, with
//     every image clean and its content as after.
import { createHash } from 'node:crypto';
import { cpSync, existsSync, mkdirSync, mkdtempSync, openSync, readSync, closeSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { tmpdir } from 'node:os';
import { run } from '../../cli/main';
import { setWriteInterposer } from '../../core/io/interpose';
import { openImage, closeChain } from '../../core/chain/open';
import { Qcow2Image } from '../../core/engine/qcow2';
import { qemuCheck } from '../oracle/qemu';
import { FaultInjector, type FaultPlan } from './fault-file';
import { CrashLog } from './crash-log';
import { rng } from '../core/jobs/helpers';

export interface View {
  /** A file of the case (a name inside its folder). */
  file: string;
  /** Read without its backing chain. */
  alone?: boolean;
  /** The image's internal snapshots (names and content) rather than its active content. */
  snapshots?: boolean;
  /**
   * 'job': as before the command or as after it, nothing in between. 'unchanged': as before.
   * 'guest': guest writes to `written`: outside those ranges as before; all of it as after
   * once the command has finished. 'result': as after once the command has succeeded, and
   * anything (consistent) before that: a target being filled, an overlay being emptied.
   */
  rule: 'job' | 'unchanged' | 'guest' | 'result';
  written?: [number, number][];
  /** Only guest bytes [from, to) count (a shrink drops the rest; a grow adds to it). */
  range?: [number, number];
}

export interface SweepCase {
  name: string;
  /** Makes the files, in `dir` (once; every run works on a copy). */
  build(dir: string): void | Promise<void>;
  /** Cases with the same key build the same files: built once per process, then copied. */
  buildKey?: string;
  /** The strata command line (after `strata`), for the files in `dir`. */
  argv(dir: string): string[];
  /** qcow2 images to check where they exist (names inside the folder). */
  images: string[];
  views: View[];
  /** Files the command creates and removes again when it fails. */
  createdTargets?: string[];
  /** stderr lines the command prints as its report before an error (check's findings). */
  reportLines?: RegExp;
}

export interface Outcome { code: number; err: string; out: string }

/** Prototypes built so far in this process, by build key. */
const BUILT = new Map<string, string>();
let cacheDir: string | null = null;
function buildCache(): string {
  if (!cacheDir) {
    const dir = mkdtempSync(join(tmpdir(), 'strata-sweep-builds-'));
    cacheDir = dir;
    process.once('exit', () => rmSync(dir, { recursive: true, force: true }));
  }
  return cacheDir;
}

/** One problem found: the case, where, and what. */
export type Violation = string;

async function strataIn(argv: string[]): Promise<Outcome> {
  let out = '';
  let err = '';
  const code = await run(argv, { out: (s) => { out += s; }, err: (s) => { err += s; }, isTTY: false }, new AbortController().signal);
  return { code, out, err };
}

function hasQcow2Magic(path: string): boolean {
  if (!existsSync(path)) return false;
  const fd = openSync(path, 'r');
  try {
    const b = Buffer.alloc(4);
    return readSync(fd, b, 0, 4, 0) === 4 && b.readUInt32BE(0) === 0x514649fb;
  } finally {
    closeSync(fd);
  }
}

/** Guest content as our engine reads it (the read path is checked against qemu-img elsewhere): hash plus size. */
async function contentOf(path: string, v: View): Promise<string> {
  const img = await openImage(path, { lock: 'none', backing: !v.alone });
  try {
    if (v.snapshots) {
      if (!(img instanceof Qcow2Image)) return 'no snapshots';
      const parts: string[] = [];
      for (const s of [...img.snapshots].sort((a, b) => a.name.localeCompare(b.name))) {
        // At the snapshot's own size (the view takes the image's current size, as qemu-img
        // convert -l does): a resize of the active layer is no change of the snapshot.
        const view = await img.snapshotView(s);
        if (s.diskSize !== null) view.virtualSize = s.diskSize;
        parts.push(`${s.name}=${await hashOf(view)}`);
      }
      return parts.join(',');
    }
    return await hashOf(img, v.range);
  } finally {
    await closeChain(img).catch(() => {});
  }
}

async function hashOf(img: { virtualSize: number; read(b: Uint8Array, o: number): Promise<void> }, range?: [number, number]): Promise<string> {
  const h = createHash('sha256');
  const buf = Buffer.alloc(1 << 20);
  const [from, to] = range ?? [0, img.virtualSize];
  for (let p = from; p < to; p += buf.length) {
    const n = Math.min(buf.length, to - p);
    await img.read(buf.subarray(0, n), p);
    h.update(buf.subarray(0, n));
  }
  return `${range ? '' : `${img.virtualSize}:`}${h.digest('hex').slice(0, 16)}`;
}

/** Guest content outside `ranges` (those bytes zeroed), hashed. */
async function outsideOf(path: string, v: View): Promise<string> {
  const img = await openImage(path, { lock: 'none', backing: !v.alone });
  try {
    const all = Buffer.alloc(img.virtualSize);
    await img.read(all, 0);
    for (const [a, b] of v.written ?? []) all.fill(0, a, b);
    return createHash('sha256').update(all).digest('hex').slice(0, 16);
  } finally {
    await closeChain(img).catch(() => {});
  }
}

export interface SweepStats { runs: number; points: number; failed: number; succeeded: number }

export class Sweep {
  readonly proto: string;
  private before = new Map<View, string>();
  private after = new Map<View, string>();
  private outsideBefore = new Map<View, string>();
  private runCount = 0;
  /** Corruptions each image had before the command (check -r all starts from a damaged one). */
  private baseline = new Map<string, number>();
  /** Operations the clean run made: writes, flushes, bytes written. */
  clean = { writes: 0, flushes: 0, bytes: 0 };

  constructor(readonly c: SweepCase, readonly root: string) {
    this.proto = join(root, 'proto');
  }

  /** Builds the files, runs the command once cleanly (it must succeed) and records before/after. */
  async prepare(): Promise<void> {
    const key = this.c.buildKey;
    const built = key ? BUILT.get(key) : undefined;
    if (built) {
      cpSync(built, this.proto, { recursive: true });
    } else {
      mkdirSync(this.proto, { recursive: true });
      await this.c.build(this.proto);
      if (key) {
        const keep = join(buildCache(), key.replace(/[^a-z0-9]+/gi, '_'));
        cpSync(this.proto, keep, { recursive: true });
        BUILT.set(key, keep);
      }
    }
    for (const name of this.c.images) {
      const p = join(this.proto, name);
      if (hasQcow2Magic(p)) this.baseline.set(name, Number(qemuCheck(p).json.corruptions ?? 0));
    }
    for (const v of this.c.views) {
      const at = join(this.proto, v.file);
      this.before.set(v, existsSync(at) ? await contentOf(at, v) : 'absent');
      if (v.rule === 'guest') this.outsideBefore.set(v, await outsideOf(join(this.proto, v.file), v));
    }
    const dir = this.copy();
    const inj = new FaultInjector();
    const o = await this.runWith(dir, (f) => inj.wrap(f));
    if (o.code !== 0) throw new Error(`${this.c.name}: clean run failed (${o.code}): ${o.err}`);
    this.clean = { writes: inj.writes, flushes: inj.flushes, bytes: inj.bytes };
    for (const v of this.c.views) this.after.set(v, await contentOf(join(dir, v.file), v));
    const problems = await this.judge(dir, { finished: true, succeeded: true });
    if (problems.length) throw new Error(`${this.c.name}: the clean run left ${problems.join('; ')}`);
    rmSync(dir, { recursive: true, force: true });
  }

  /** A fresh copy of the prototype folder. */
  private copy(): string {
    const dir = join(this.root, `run-${this.runCount++}`);
    cpSync(this.proto, dir, { recursive: true });
    return dir;
  }

  private async runWith(dir: string, wrap: Parameters<typeof setWriteInterposer>[0]): Promise<Outcome> {
    const prev = setWriteInterposer(wrap);
    try {
      return await strataIn(this.c.argv(dir));
    } finally {
      setWriteInterposer(prev);
    }
  }

  /** Runs the command with `plan`; returns the problems found (empty when all is as it must be). */
  async fault(plan: FaultPlan): Promise<{ problems: Violation[]; hit: boolean; outcome: Outcome }> {
    const dir = this.copy();
    try {
      const inj = new FaultInjector(plan);
      const o = await this.runWith(dir, (f) => inj.wrap(f));
      const hit = inj.injected.length > 0;
      const problems = await this.outcome(dir, dir, o, hit, plan.code, `${JSON.stringify(plan)} -> exit ${o.code}`, inj.injected[0]);
      return { problems, hit, outcome: o };
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }

  /**
   * Runs the command on a fresh copy through another path to the same folder (`through`: a
   * FUSE mount that fails a write), after `arm()`; `met()` then says whether the fault was met.
   */
  async faultThrough(through: (dir: string) => string, arm: () => void, met: () => boolean, code: FaultPlan['code'], label: string): Promise<{ problems: Violation[]; hit: boolean; outcome: Outcome }> {
    const dir = this.copy();
    try {
      arm();
      const o = await strataIn(this.c.argv(through(dir)));
      const hit = met();
      // Below the engine a failed request can come back as a short write, which is retried
      // (and succeeds when the failure was transient): success is then right, if everything
      // is in place, as judge() requires of any success.
      const problems = await this.outcome(dir, through(dir), o, hit, code, `${label} -> exit ${o.code}`, label, true);
      return { problems, hit, outcome: o };
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }

  /**
   * Runs the command with `inj` under its files (a plain injector whose beforeEachWrite fills
   * the disk, say): a failure the files report counts as the fault met.
   */
  async withInjector(inj: FaultInjector, code: FaultPlan['code'], label: string): Promise<{ problems: Violation[]; hit: boolean; outcome: Outcome }> {
    const dir = this.copy();
    try {
      const o = await this.runWith(dir, (f) => inj.wrap(f));
      const hit = inj.injected.length > 0 || inj.real.length > 0;
      const problems = await this.outcome(dir, dir, o, hit, code, `${label} -> exit ${o.code}`, inj.real[0] ?? inj.injected[0]);
      return { problems, hit, outcome: o };
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }

  /** Runs the command cleanly through `through` (it must succeed, as after the clean run). */
  async cleanThrough(through: (dir: string) => string): Promise<Violation[]> {
    const dir = this.copy();
    try {
      const o = await strataIn(this.c.argv(through(dir)));
      if (o.code !== 0) return [`clean run through ${through(dir)} failed (${o.code}): ${o.err}`];
      return await this.judge(dir, { finished: true, succeeded: true });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }

  /** The rules for a run that may have met a fault (the files in `dir`, named `shown` to the command). */
  private async outcome(dir: string, shown: string, o: Outcome, hit: boolean, code: FaultPlan['code'], where: string, first?: string, retried = false): Promise<Violation[]> {
    const problems: Violation[] = [];
    if (hit && o.code === 0 && !retried) problems.push(`${where}: succeeded after ${first}`);
    if (o.code !== 0) {
      const lines = o.err.trimEnd().split('\n').filter((l) => !this.c.reportLines?.test(l));
      const cause = code === 'EIO' ? /i\/o error|input\/output error/i : /no space left/i;
      if (lines.length !== 1 || !lines[0]!.startsWith('strata: ')) problems.push(`${where}: stderr is not one line: ${JSON.stringify(o.err)}`);
      if (!cause.test(o.err)) problems.push(`${where}: the error does not say ${code}: ${JSON.stringify(o.err)}`);
      if (!o.err.includes(shown)) problems.push(`${where}: the error names no file: ${JSON.stringify(o.err)}`);
      if (!hit) problems.push(`${where}: failed without a fault: ${JSON.stringify(o.err)}`);
      for (const t of this.c.createdTargets ?? []) if (existsSync(join(dir, t))) problems.push(`${where}: ${t} was left behind`);
    }
    for (const p of await this.judge(dir, { finished: o.code === 0, succeeded: o.code === 0 })) problems.push(`${where}: ${p}`);
    return problems;
  }

  /**
   * Runs the command once with its writes logged, then checks the files as a power cut could
   * leave them at `cuts` cut points (all of them when there are no more; else spread evenly),
   * each with a random subset of the unflushed sectors landed.
   */
  async crash(cuts: number, seed: number): Promise<{ problems: Violation[]; points: number; checked: number }> {
    const dir = this.copy();
    const log = new CrashLog();
    const o = await this.runWith(dir, (f) => log.wrap(f));
    if (o.code !== 0) throw new Error(`${this.c.name}: logged run failed (${o.code}): ${o.err}`);
    const points = log.cutPoints();
    const chosen = points.length <= cuts ? points : Array.from({ length: cuts }, (_, i) => points[Math.floor((i * points.length) / cuts)]!);
    const r = rng(seed);
    const problems: Violation[] = [];
    const cutDir = join(this.root, `cut-${this.runCount++}`);
    const seen = new Set<string>();
    let checked = 0;
    const last = points[points.length - 1]!;
    for (const at of chosen) {
      const p = r();
      const state = log.stateAt(at, () => r() < p);
      // Identical states need checking once.
      const key = createHash('sha256');
      for (const [f, b] of state.files) key.update(f).update(b);
      const k = key.digest('hex');
      if (seen.has(k)) continue;
      seen.add(k);
      rmSync(cutDir, { recursive: true, force: true });
      cpSync(this.proto, cutDir, { recursive: true });
      for (const [f, b] of state.files) {
        const name = f.slice(dir.length + 1);
        writeFileSync(join(cutDir, name), b);
      }
      checked++;
      for (const q of await this.judge(cutDir, { finished: at === last && state.pending === 0, succeeded: false })) problems.push(`cut at ${at}/${last} (${state.pending} pending): ${q}`);
    }
    rmSync(cutDir, { recursive: true, force: true });
    rmSync(dir, { recursive: true, force: true });
    return { problems, points: points.length, checked };
  }

  /** Checks the images in `dir` and the views, as the rules at the top say. */
  private async judge(dir: string, s: { finished: boolean; succeeded: boolean }): Promise<Violation[]> {
    const out: Violation[] = [];
    for (const name of this.c.images) {
      const p = join(dir, name);
      if (!hasQcow2Magic(p)) {
        // Only a target the command creates may be missing (or not an image yet).
        if (!(this.c.createdTargets ?? []).includes(name)) out.push(`${name} is not a qcow2 image any more`);
        continue;
      }
      const r = this.qemuCheckCached(p);
      const corruptions = Number(r.json.corruptions ?? 0);
      const errors = Number(r.json['check-errors'] ?? 0);
      const leaks = Number(r.json.leaks ?? 0);
      const allowed = s.succeeded ? 0 : this.baseline.get(name) ?? 0;
      const status = corruptions ? 2 : r.status;
      if (corruptions > allowed || errors || ![0, 2, 3].includes(status)) out.push(`${name}: qemu-img check: ${corruptions} corruptions, ${errors} check errors (exit ${r.status})`);
      else if (s.succeeded && leaks) out.push(`${name}: ${leaks} leaked clusters after a successful run`);
    }
    for (const v of this.c.views) {
      const p = join(dir, v.file);
      const target = (this.c.createdTargets ?? []).includes(v.file);
      if (!existsSync(p)) { if (!target) out.push(`${v.file} is gone`); continue; }
      // A target half made by a command cut short need not be an image yet.
      if (target && !s.succeeded && !hasQcow2Magic(p)) continue;
      let got: string;
      try {
        got = await contentOf(p, v);
      } catch (err) {
        out.push(`${v.file} cannot be read: ${(err as Error).message}`);
        continue;
      }
      const before = this.before.get(v)!;
      const after = this.after.get(v);
      const what = `${v.file}${v.alone ? ' (alone)' : ''}${v.snapshots ? ' snapshots' : ''}`;
      if (s.succeeded && after !== undefined && got !== after) { out.push(`${what} does not read as after the command`); continue; }
      switch (v.rule) {
        case 'unchanged':
          if (got !== before) out.push(`${what} changed`);
          break;
        case 'job':
          if (got !== before && got !== after) out.push(`${what} reads neither as before nor as after the command`);
          break;
        case 'result':
          break;
        case 'guest':
          if (s.finished && after !== undefined && got !== after) out.push(`${what} does not hold the writes after the command finished`);
          else if (got !== after && (await outsideOf(p, v)) !== this.outsideBefore.get(v)) out.push(`${what} changed outside the ranges written`);
          break;
      }
    }
    return out;
  }

  private checks = new Map<string, ReturnType<typeof qemuCheck>>();
  /** qemu-img check of `p`, once per distinct content (runs often leave files as they were). */
  private qemuCheckCached(p: string): ReturnType<typeof qemuCheck> {
    const key = createHash('sha256').update(readFileSync(p)).digest('hex');
    let r = this.checks.get(key);
    if (!r) { r = qemuCheck(p); this.checks.set(key, r); }
    this.qemuChecks++;
    return r;
  }

  /** qemu-img checks asked for (some answered from the cache). */
  qemuChecks = 0;

  /** Removes everything the sweep made. */
  cleanup(): void {
    for (const e of existsSync(this.root) ? readdirSync(this.root) : []) rmSync(join(this.root, e), { recursive: true, force: true });
  }
}

/** The first `n` of 1..total, or n of them spread over it (always including the first and last). */
export function spread(total: number, n: number): number[] {
  if (total <= n) return Array.from({ length: total }, (_, i) => i + 1);
  const out = new Set<number>();
  for (let i = 0; i < n; i++) out.add(1 + Math.round((i * (total - 1)) / (n - 1)));
  return [...out];
}
