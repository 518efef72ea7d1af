// Wrappers around qemu-img and qemu-io, our test oracle. Tests that need them call
// `describeOracle`: with qemu-img missing they skip loudly, and under CI=true they fail.
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'vitest';

function probe(tool: string): boolean {
  const r = spawnSync(tool, ['--version'], { encoding: 'utf8' });
  return r.status === 0;
}

export const haveQemu = probe('qemu-img') && probe('qemu-io');

/** qemu-nbd and nbdinfo (libnbd-bin): the persistent-bitmap tests need both. */
export const haveNbd = probe('qemu-nbd') && probe('nbdinfo');

let warned = false;
/** describe() for tests that need qemu-img/qemu-io. */
export function describeOracle(name: string, fn: () => void): void {
  if (haveQemu) {
    describe(name, fn);
    return;
  }
  if (process.env.CI === 'true') {
    describe(name, () => {
      it('needs qemu-img and qemu-io (install qemu-utils)', () => {
        throw new Error('qemu-img/qemu-io missing under CI=true: .ci/run must install qemu-utils');
      });
    });
    return;
  }
  if (!warned) {
    warned = true;
    process.stderr.write('\n*** qemu-img/qemu-io NOT FOUND: oracle tests are SKIPPED. Install qemu-utils to run them. ***\n\n');
  }
  describe.skip(name, fn);
}

/** The qemu-img version found ("7.2.22"), or null without one. */
export const qemuVersion: string | null = (() => {
  const r = spawnSync('qemu-img', ['--version'], { encoding: 'utf8' });
  return r.status === 0 ? (/version (\d+\.\d+\.\d+)/.exec(r.stdout)?.[1] ?? null) : null;
})();

/** The series whose exact output (messages, human text, JSON field order) the tests expect. */
export const QEMU_TEXT_SERIES = '7.2';

/**
 * describeOracle for tests that compare qemu-img's exact output: their first test checks that
 * the qemu-img found is 7.2.x, and says plainly when it is not (the others may then fail on
 * wording alone).
 */
export function describeOracleText(name: string, fn: () => void): void {
  describeOracle(name, () => {
    it(`qemu-img is ${QEMU_TEXT_SERIES}.x, whose exact output these tests compare`, () => {
      if (!qemuVersion?.startsWith(`${QEMU_TEXT_SERIES}.`)) {
        throw new Error(`these tests compare qemu-img ${QEMU_TEXT_SERIES}'s exact output, but qemu-img ${qemuVersion ?? '(version unknown)'} is installed: differences below may be wording only`);
      }
    });
    fn();
  });
}

/**
 * QEMU's LUKS code times PBKDF2 by the thread's CPU time and gives up when a round measured
 * 0 ms ("Unable to get accurate CPU usage"), which a busy machine's tick-based accounting can
 * report: such a run of qemu-img (it wrote nothing) is run again, a few times at most.
 */
const CPU_USAGE_FLAKE = /Unable to get accurate CPU usage/;

export function qemuImg(...args: string[]): string {
  for (let attempt = 1; ; attempt++) {
    try {
      return execFileSync('qemu-img', args, { encoding: 'utf8', maxBuffer: 256 << 20, stdio: ['ignore', 'pipe', 'pipe'] });
    } catch (err) {
      if (attempt === 5 || !CPU_USAGE_FLAKE.test(String((err as { stderr?: string }).stderr ?? ''))) throw err;
    }
  }
}

/** Runs qemu-img and returns status, stdout and stderr without throwing. */
export function qemuImgRun(...args: string[]): { status: number; stdout: string; stderr: string } {
  for (let attempt = 1; ; attempt++) {
    const r = spawnSync('qemu-img', args, { encoding: 'utf8', maxBuffer: 256 << 20 });
    if (attempt < 5 && r.status !== 0 && CPU_USAGE_FLAKE.test(r.stderr)) continue;
    return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
  }
}

/** Runs qemu-io commands against an image (read-write). */
export function qemuIo(file: string, cmds: string[], opts: { format?: string } = {}): string {
  const args: string[] = [];
  if (opts.format) args.push('-f', opts.format);
  for (const c of cmds) args.push('-c', c);
  args.push(file);
  const out = execFileSync('qemu-io', args, { encoding: 'utf8', maxBuffer: 256 << 20 });
  if (/error|failed/i.test(out)) throw new Error(`qemu-io ${cmds.join('; ')} on ${file}: ${out}`);
  return out;
}

export function qemuCheck(file: string): { status: number; json: Record<string, unknown> } {
  const r = qemuImgRun('check', '--output=json', file);
  return { status: r.status, json: r.stdout ? JSON.parse(r.stdout) : {} };
}

export function tempDir(prefix = 'strata-test-'): { dir: string; path: (name: string) => string; cleanup: () => void } {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  return { dir, path: (name) => join(dir, name), cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

/**
 * The ranges a persistent bitmap marks dirty, as QEMU reports them: qemu-nbd exports the image
 * with the bitmap (-B) and nbdinfo (libnbd-bin) lists the qemu:dirty-bitmap meta context.
 * Returns [start, end) pairs of dirty bytes.
 */
export function dirtyRanges(file: string, bitmap: string): [number, number][] {
  if (!haveNbd) throw new Error('qemu-nbd and nbdinfo are needed (apt-get install qemu-utils libnbd-bin; .ci/run installs them)');
  const r = spawnSync('nbdinfo', ['--json', `--map=qemu:dirty-bitmap:${bitmap}`, '--', '[', 'qemu-nbd', '-r', '-f', 'qcow2', '-B', bitmap, file, ']'], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`nbdinfo on ${file} (bitmap ${bitmap}) failed: ${r.stderr}`);
  const map = JSON.parse(r.stdout) as { offset: number; length: number; type: number }[];
  return map.filter((e) => e.type & 1).map((e) => [e.offset, e.offset + e.length]);
}
