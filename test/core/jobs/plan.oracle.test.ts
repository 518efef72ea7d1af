// Plans of every writing job. For each command: `--dry-run` (human and JSON) leaves every file in
// the folder byte for byte and mtime as it was, and creates none; the CLI's JSON is the API's
// planJob for the same JobSpec; and runJob then does what the plan said: the bytes it writes as
// data, and what each file grows by, within a cluster per image. Then: a commit into a base
// another overlay shares lists that overlay as affected and is refused without --force; an
// image a QEMU process holds is listed as blocked with its holder, and the run is refused.
import { spawnSync } from 'node:child_process';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { afterAll, expect, it } from 'vitest';
import { describeOracle, qemuImg, qemuIo, tempDir } from '../../oracle/qemu';
import { startHolder } from '../../oracle/holders';
import { strata } from '../../cli/run-cli';
import { expectClean, guestHash, MiB } from './helpers';
import { planJob, planToJson } from '../../../core/jobs/plan';
import { runJob } from '../../../core/jobs/operations';
import type { JobSpec } from '../../../core/jobs/plan-kit';
import { InUseError, UsageError } from '../../../core/errors';

interface FileState { hash: string; mtimeMs: number; size: number; blocks: number }

/** Every file in `dir` (dot files included): content, mtime, size, allocation. */
function snapshot(dir: string): Record<string, FileState> {
  const out: Record<string, FileState> = {};
  for (const name of readdirSync(dir).sort()) {
    const p = join(dir, name);
    const st = statSync(p);
    if (!st.isFile()) continue;
    out[name] = { hash: createHash('sha256').update(readFileSync(p)).digest('hex'), mtimeMs: st.mtimeMs, size: st.size, blocks: st.blocks };
  }
  return out;
}

const CS = 64 * 1024;

interface Case {
  name: string;
  setup: (p: (n: string) => string) => void;
  argv: (p: (n: string) => string) => string[];
  spec: (p: (n: string) => string) => JobSpec;
  /** Files whose guest content must read the same after the run (as hashed before). */
  sameContent?: string[];
}

const chain3 = (p: (n: string) => string) => {
  qemuImg('create', '-q', '-f', 'qcow2', p('base.qcow2'), '64M');
  qemuIo(p('base.qcow2'), ['write -P 0x11 0 24M']);
  qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', p('mid.qcow2'));
  qemuIo(p('mid.qcow2'), ['write -P 0x22 16M 8M', 'write -P 0x23 40M 4M']);
  qemuImg('create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', p('top.qcow2'));
  qemuIo(p('top.qcow2'), ['write -P 0x33 20M 2M', 'write -P 0x34 50M 1M']);
};

const plain = (p: (n: string) => string) => {
  qemuImg('create', '-q', '-f', 'qcow2', p('img.qcow2'), '64M');
  qemuIo(p('img.qcow2'), ['write -P 0x41 0 8M', 'write -P 0x42 30M 3M', 'write -z 40M 4M']);
};

const CASES: Case[] = [
  {
    name: 'convert -O qcow2', setup: plain,
    argv: (p) => ['convert', '-O', 'qcow2', p('img.qcow2'), p('out.qcow2')],
    spec: (p) => ({ op: 'convert', source: p('img.qcow2'), target: p('out.qcow2'), targetFormat: 'qcow2' }),
  },
  {
    name: 'convert -O raw', setup: plain,
    argv: (p) => ['convert', '-O', 'raw', p('img.qcow2'), p('out.raw')],
    spec: (p) => ({ op: 'convert', source: p('img.qcow2'), target: p('out.raw'), targetFormat: 'raw' }),
  },
  {
    name: 'compact',
    setup: (p) => {
      qemuImg('create', '-q', '-f', 'qcow2', p('img.qcow2'), '64M');
      qemuIo(p('img.qcow2'), ['write -P 0x51 0 64M', 'write -z 8M 40M']);
    },
    argv: (p) => ['compact', p('img.qcow2')],
    spec: (p) => ({ op: 'compact', image: p('img.qcow2') }),
    sameContent: ['img.qcow2'],
  },
  {
    name: 'rebase', setup: chain3,
    argv: (p) => ['rebase', '-b', 'base.qcow2', '-F', 'qcow2', p('top.qcow2')],
    spec: (p) => ({ op: 'rebase', image: p('top.qcow2'), backing: 'base.qcow2', backingFormat: 'qcow2' }),
    sameContent: ['top.qcow2'],
  },
  {
    name: 'commit', setup: chain3,
    argv: (p) => ['commit', p('top.qcow2')],
    spec: (p) => ({ op: 'commit', image: p('top.qcow2') }),
    sameContent: ['top.qcow2'],
  },
  {
    name: 'empty',
    setup: (p) => {
      chain3(p);
      qemuImg('commit', '-q', '-d', p('top.qcow2'));
    },
    argv: (p) => ['empty', p('top.qcow2')],
    spec: (p) => ({ op: 'empty', image: p('top.qcow2') }),
    sameContent: ['top.qcow2'],
  },
  {
    name: 'merge', setup: chain3,
    argv: (p) => ['merge', p('mid.qcow2')],
    spec: (p) => ({ op: 'merge', image: p('mid.qcow2') }),
    sameContent: ['top.qcow2'],
  },
  {
    name: 'mirror', setup: plain,
    argv: (p) => ['mirror', '-O', 'qcow2', p('img.qcow2'), p('m.qcow2')],
    spec: (p) => ({ op: 'mirror', source: p('img.qcow2'), target: p('m.qcow2'), targetFormat: 'qcow2' }),
  },
  {
    name: 'snapshot -c', setup: plain,
    argv: (p) => ['snapshot', '-c', 's1', p('img.qcow2')],
    spec: (p) => ({ op: 'snapshot', image: p('img.qcow2'), action: 'create', name: 's1' }),
    sameContent: ['img.qcow2'],
  },
  {
    name: 'snapshot -a',
    setup: (p) => { plain(p); qemuImg('snapshot', '-c', 's0', p('img.qcow2')); qemuIo(p('img.qcow2'), ['write -P 0x61 1M 2M']); },
    argv: (p) => ['snapshot', '-a', 's0', p('img.qcow2')],
    spec: (p) => ({ op: 'snapshot', image: p('img.qcow2'), action: 'apply', name: 's0' }),
  },
  {
    name: 'snapshot -d',
    setup: (p) => { plain(p); qemuImg('snapshot', '-c', 's0', p('img.qcow2')); },
    argv: (p) => ['snapshot', '-d', 's0', p('img.qcow2')],
    spec: (p) => ({ op: 'snapshot', image: p('img.qcow2'), action: 'delete', name: 's0' }),
    sameContent: ['img.qcow2'],
  },
  {
    name: 'resize', setup: plain,
    argv: (p) => ['resize', p('img.qcow2'), '+1G'],
    spec: (p) => ({ op: 'resize', image: p('img.qcow2'), size: 1024 * MiB, relative: true }),
  },
  {
    name: 'check -r all', setup: plain,
    argv: (p) => ['check', '-r', 'all', p('img.qcow2')],
    spec: (p) => ({ op: 'check', image: p('img.qcow2'), repair: 'all' }),
    sameContent: ['img.qcow2'],
  },
  {
    name: 'create', setup: () => {},
    argv: (p) => ['create', '-f', 'qcow2', p('new.qcow2'), '64M'],
    spec: (p) => ({ op: 'create', image: p('new.qcow2'), format: 'qcow2', size: 64 * MiB }),
  },
];

/** The plan JSON without what changes from moment to moment (free space). */
function stable(j: Record<string, unknown>): Record<string, unknown> {
  const c = JSON.parse(JSON.stringify(j)) as Record<string, unknown>;
  delete c['space-available'];
  for (const s of c.space as Record<string, unknown>[]) delete s.available;
  return c;
}

describeOracle('plans: a dry run writes nothing, and the run does what it says', () => {
  const work = tempDir('strata-plan-');
  afterAll(() => work.cleanup());
  const report: string[] = [];
  afterAll(() => console.log(`[plan] dry-run figures against the run:\n  ${report.join('\n  ')}`));

  for (const c of CASES) {
    it(`${c.name}: --dry-run leaves every file as it was; the run matches the plan`, async () => {
      const dir = join(work.dir, c.name.replace(/\W+/g, '-'));
      const { mkdirSync } = await import('node:fs');
      mkdirSync(dir);
      const p = (n: string) => join(dir, n);
      c.setup(p);
      const before = snapshot(dir);
      const contentBefore = Object.fromEntries((c.sameContent ?? []).map((f) => [f, guestHash(p(f))]));

      // The options right after the command name (resize takes its last argument as the size).
      const argv = c.argv(p);
      const text = await strata(argv[0]!, '--dry-run', ...argv.slice(1));
      expect({ code: text.code, err: text.err }).toEqual({ code: 0, err: '' });
      expect(text.out).toMatch(/^Plan: /);
      const dry = await strata(argv[0]!, '--dry-run', '--output=json', ...argv.slice(1));
      expect({ code: dry.code, err: dry.err }).toEqual({ code: 0, err: '' });
      expect(snapshot(dir)).toStrictEqual(before);
      const json = JSON.parse(dry.out) as Record<string, unknown>;
      for (const k of ['writes', 'creates', 'affected', 'blocked', 'bytes-to-copy', 'space-needed', 'space-available', 'warnings', 'command']) {
        expect(json, k).toHaveProperty(k);
      }
      expect({ affected: json.affected, blocked: json.blocked, problems: json.problems }).toEqual({ affected: [], blocked: [], problems: [] });
      // The API's plan for the JobSpec is the CLI's.
      const spec = c.spec(p);
      expect(stable(planToJson(await planJob(spec)))).toStrictEqual(stable(json));
      expect(snapshot(dir)).toStrictEqual(before);

      const r = await runJob({}, spec);
      const after = snapshot(dir);
      const plan = r.plan;
      const touched = [...plan.writes, ...plan.creates, ...plan.renames.map((x) => x.to)];
      const tolerance = Math.max(1, new Set(touched).size) * CS;
      expect(Math.abs(r.bytesWritten - plan.bytesToCopy), `bytes written ${r.bytesWritten}, plan ${plan.bytesToCopy}`).toBeLessThanOrEqual(tolerance);
      // What each file grew by against the plan's figure for it: a qcow2 file by its length (its
      // clusters are allocated at the end, and a cluster counts whole even where only part of it
      // was written), a raw file by its allocated blocks (it is sparse).
      const grownBy = (name: string) => name.endsWith('.raw')
        ? ((after[name]?.blocks ?? 0) - (before[name]?.blocks ?? 0)) * 512
        : (after[name]?.size ?? 0) - (before[name]?.size ?? 0);
      const lines: string[] = [];
      for (const s of plan.space) {
        for (const f of s.files) {
          const name = f.filename.slice(dir.length + 1);
          const grew = grownBy(name);
          if (c.name === 'compact') {
            // The copy replaced the original: its length is what the plan expected after.
            const got = Math.ceil(after[name]!.size / CS) * CS;
            expect(Math.abs(got - plan.expectedSize!.after), `${name}: ${got} after, plan ${plan.expectedSize!.after}`).toBeLessThanOrEqual(CS);
            lines.push(`${c.name} ${name}: expected after ${plan.expectedSize!.after}, actual ${got} (allocated ${after[name]!.blocks * 512}); bytes plan ${plan.bytesToCopy} run ${r.bytesWritten}`);
            continue;
          }
          // Emptying an overlay needs its few clusters only for a moment (the file then shrinks).
          if (grew < 0) { expect(f.needed, name).toBeLessThanOrEqual(4 * CS); continue; }
          // snapshot -c needs room for a moment for its interim copies of the active tables and
          // a refcount structure, cut off the file at the end: the plan counts them.
          if (c.name === 'snapshot -c') {
            expect(grew, name).toBeLessThanOrEqual(f.needed);
            expect(f.needed, `${name}: grew ${grew}, plan ${f.needed}`).toBeLessThanOrEqual(grew + 8 * CS);
            lines.push(`${c.name} ${name}: grew ${grew}, plan (with the interim copies) ${f.needed}`);
            continue;
          }
          expect(Math.abs(grew - f.needed), `${name}: grew ${grew}, plan ${f.needed}`).toBeLessThanOrEqual(CS + 4096);
          lines.push(`${c.name} ${name}: grew ${grew}, plan ${f.needed}; bytes plan ${plan.bytesToCopy} run ${r.bytesWritten}`);
        }
      }
      if (!lines.length) lines.push(`${c.name}: bytes plan ${plan.bytesToCopy} run ${r.bytesWritten}`);
      report.push(...lines);
      for (const f of [...plan.writes, ...plan.creates]) if (f.endsWith('.qcow2')) expectClean(f);
      for (const [f, h] of Object.entries(contentBefore)) expect(guestHash(p(f)), f).toBe(h);
      for (const f of plan.removes) expect(Object.keys(after)).not.toContain(f.slice(dir.length + 1));
    });
  }

  it('commit into a shared base: the other overlay is affected, the run refused without --force', async () => {
    const dir = join(work.dir, 'shared');
    const { mkdirSync } = await import('node:fs');
    mkdirSync(dir);
    const p = (n: string) => join(dir, n);
    chain3(p);
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', p('other.qcow2'));
    // The folder scan reads regular files only: a FIFO there (opening it would block) is skipped.
    expect(spawnSync('mkfifo', [p('pipe.qcow2')]).status).toBe(0);
    const before = snapshot(dir);
    const dry = await strata('commit', '--dry-run', '--output=json', p('top.qcow2'));
    expect(dry.code).toBe(1); // the run would be refused
    const json = JSON.parse(dry.out) as { affected: { filename: string }[]; 'needs-force': string | null };
    expect(json.affected.map((a) => a.filename)).toEqual([p('other.qcow2')]);
    expect(json['needs-force']).toContain('--force');
    const text = await strata('commit', '--dry-run', p('top.qcow2'));
    expect(text.out).toContain(`affected (their content changes):\n    ${p('other.qcow2')}`);
    expect(text.out).toContain('would refuse without --force');
    expect((await strata('commit', '--dry-run', '--force', p('top.qcow2'))).code).toBe(0);
    expect(snapshot(dir)).toStrictEqual(before);
    await expect(runJob({}, { op: 'commit', image: p('top.qcow2') })).rejects.toBeInstanceOf(UsageError);
    const refused = await strata('commit', p('top.qcow2'));
    expect(refused.code).toBe(2);
    expect(refused.err).toMatch(/^strata: refused: .*other\.qcow2.*--force/);
    expect(snapshot(dir)).toStrictEqual(before);
    const otherBefore = guestHash(p('other.qcow2'));
    const topBefore = guestHash(p('top.qcow2'));
    const r = await runJob({}, { op: 'commit', image: p('top.qcow2') }, { force: true });
    expect(r.plan.affected.map((a) => a.filename)).toEqual([p('other.qcow2')]);
    expect(guestHash(p('top.qcow2'))).toBe(topBefore);
    expect(guestHash(p('other.qcow2'))).not.toBe(otherBefore);
  });

  it('an image a QEMU process holds: blocked, with its holder; the run refused and nothing written', async () => {
    const dir = join(work.dir, 'held');
    const { mkdirSync } = await import('node:fs');
    mkdirSync(dir);
    const p = (n: string) => join(dir, n);
    chain3(p);
    const holder = await startHolder('qemu-io', p('top.qcow2'), p('sock'));
    try {
      const before = snapshot(dir);
      const dry = await strata('commit', '--dry-run', '--output=json', p('top.qcow2'));
      expect(dry.code).toBe(1);
      const json = JSON.parse(dry.out) as { blocked: { filename: string; holder: { pid: number; program: string } | null }[] };
      const top = json.blocked.find((b) => b.filename === p('top.qcow2'));
      expect(top?.holder).toEqual({ pid: holder.pid, program: 'qemu-io', vm: null });
      // The VM's backing files are held too: the commit could not write mid.qcow2 either.
      expect(json.blocked.map((b) => b.filename)).toContain(p('mid.qcow2'));
      await expect(runJob({}, { op: 'commit', image: p('top.qcow2') })).rejects.toBeInstanceOf(InUseError);
      const r = await strata('commit', p('top.qcow2'));
      expect(r.code).toBe(1);
      expect(r.err).toBe(`strata: ${p('top.qcow2')}: image is in use: Failed to get "write" lock; PID ${holder.pid} (qemu-io) holds it. Stop the VM or process first (read-only commands work with -U)\n`);
      expect(snapshot(dir)).toStrictEqual(before);
    } finally {
      await holder.stop();
    }
  });
});
