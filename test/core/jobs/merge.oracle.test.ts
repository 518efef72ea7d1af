// merge: a layer taken out of its chain. The middle of a three-deep chain and a layer with two
// children (one in another folder, given with --folder): the children read exactly as before,
// qemu-img info --backing-chain shows the shorter chain, the layer's file is gone. A backing
// file shared with another overlay is refused without --force. Interrupted at each step (a
// cancel between steps, and the real CLI SIGKILLed at random moments), every remaining image
// reads as before and a rerun finishes the job.
import { spawn } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, readdirSync, watch } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { describeOracle, qemuCheck, qemuImg, qemuIo, tempDir } from '../../oracle/qemu';
import { ensureBuilt, repoRoot, strata } from '../../cli/run-cli';
import { expectClean, fileHash, guestHash, MiB, rng } from './helpers';
import { merge, mergeJournalPath } from '../../../core/jobs/merge';
import { CancelledError } from '../../../core/errors';

/** base <- mid <- {top1, other/top2}: 64 MiB, data in every layer, zeros over data in mid. */
function buildChain(dir: string): void {
  const p = (n: string) => join(dir, n);
  mkdirSync(p('other'), { recursive: true });
  qemuImg('create', '-q', '-f', 'qcow2', p('base.qcow2'), '64M');
  qemuIo(p('base.qcow2'), ['write -P 0x11 0 40M']);
  qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', p('mid.qcow2'));
  qemuIo(p('mid.qcow2'), ['write -P 0x22 8M 24M', 'write -z 36M 2M', 'write -P 0x23 50M 6M']);
  qemuImg('create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', p('top1.qcow2'));
  qemuIo(p('top1.qcow2'), ['write -P 0x31 10M 1M']);
  qemuImg('create', '-q', '-f', 'qcow2', '-b', '../mid.qcow2', '-F', 'qcow2', p('other/top2.qcow2'));
  qemuIo(p('other/top2.qcow2'), ['write -P 0x32 52M 1M']);
}

function backingChain(file: string): string[] {
  return (JSON.parse(qemuImg('info', '-U', '--output=json', '--backing-chain', file)) as { filename: string }[]).map((i) => i.filename);
}

describeOracle('merge', () => {
  const t = tempDir('strata-merge-');
  afterAll(() => t.cleanup());

  it('the middle of a three-deep chain: the top reads the same, the chain is two deep, the layer is gone', async () => {
    const dir = join(t.dir, 'three');
    mkdirSync(dir);
    const p = (n: string) => join(dir, n);
    qemuImg('create', '-q', '-f', 'qcow2', p('base.qcow2'), '64M');
    qemuIo(p('base.qcow2'), ['write -P 0x11 0 40M']);
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', '-b', 'base.qcow2', '-F', 'qcow2', p('mid.qcow2'));
    qemuIo(p('mid.qcow2'), ['write -P 0x22 8M 24M', 'write -z 36M 2M', 'write -P 0x23 50M 6M', 'write -P 0x24 63M 4097']);
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', p('top.qcow2'));
    qemuIo(p('top.qcow2'), ['write -P 0x31 10M 1M']);
    const before = guestHash(p('top.qcow2'));
    const r = await strata('merge', p('mid.qcow2'));
    expect({ code: r.code, out: r.out, err: r.err }).toEqual({ code: 0, out: 'Image merged.\n', err: '' });
    expect(existsSync(p('mid.qcow2'))).toBe(false);
    expect(existsSync(mergeJournalPath(p('mid.qcow2')))).toBe(false);
    expect(backingChain(p('top.qcow2'))).toEqual(['top.qcow2', 'base.qcow2'].map(p));
    expect(qemuImg('info', '-U', p('top.qcow2'))).toMatch(/backing file: base\.qcow2( \(actual path: [^)]*\))?\nbacking file format: qcow2/);
    expect(guestHash(p('top.qcow2'))).toBe(before);
    expectClean(p('top.qcow2'));
    expectClean(p('base.qcow2'));
  });

  it('a layer with two children, one in another folder (--folder): both read the same, both now on the base', async () => {
    const dir = join(t.dir, 'two');
    buildChain(dir);
    const p = (n: string) => join(dir, n);
    const before = [guestHash(p('top1.qcow2')), guestHash(p('other/top2.qcow2'))];
    // Without --folder only the child beside the layer is found; the plan says which.
    const dry = JSON.parse((await strata('merge', '--dry-run', '--output=json', '--folder', p('other'), p('mid.qcow2'))).out) as { writes: string[]; removes: string[]; 'chains-after': { filename: string }[][] };
    expect(dry.writes).toEqual([p('base.qcow2'), p('other/top2.qcow2'), p('top1.qcow2')]);
    expect(dry.removes).toEqual([p('mid.qcow2')]);
    expect(dry['chains-after'].map((c) => c.map((l) => l.filename))).toEqual([[p('other/top2.qcow2'), p('base.qcow2')], [p('top1.qcow2'), p('base.qcow2')]]);
    const r = await strata('merge', '--folder', p('other'), p('mid.qcow2'));
    expect({ code: r.code, err: r.err }).toEqual({ code: 0, err: '' });
    expect(existsSync(p('mid.qcow2'))).toBe(false);
    expect(backingChain(p('top1.qcow2'))).toEqual([p('top1.qcow2'), p('base.qcow2')]);
    expect(backingChain(p('other/top2.qcow2'))).toEqual([p('other/top2.qcow2'), `${dir}/other/../base.qcow2`]);
    expect(qemuImg('info', '-U', p('other/top2.qcow2'))).toMatch(/backing file: \.\.\/base\.qcow2[ \n]/);
    expect([guestHash(p('top1.qcow2')), guestHash(p('other/top2.qcow2'))]).toEqual(before);
    for (const f of ['base.qcow2', 'top1.qcow2', 'other/top2.qcow2']) expectClean(p(f));
  });

  it('refused without --force when the backing file has another overlay; nothing changes', async () => {
    const dir = join(t.dir, 'shared');
    buildChain(dir);
    const p = (n: string) => join(dir, n);
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', p('sibling.qcow2'));
    const hashes = readdirSync(dir).filter((f) => f.endsWith('.qcow2')).map((f) => fileHash(p(f)));
    const r = await strata('merge', p('mid.qcow2'));
    expect(r.code).toBe(2);
    expect(r.err).toMatch(/sibling\.qcow2.*--force/);
    expect(readdirSync(dir).filter((f) => f.endsWith('.qcow2')).map((f) => fileHash(p(f)))).toEqual(hashes);
    const sibling = guestHash(p('sibling.qcow2'));
    const top1 = guestHash(p('top1.qcow2'));
    const forced = await strata('merge', '--force', p('mid.qcow2'));
    expect(forced.code).toBe(0);
    expect(forced.err).toMatch(/warning: .*sibling\.qcow2/);
    expect(guestHash(p('top1.qcow2'))).toBe(top1);
    expect(guestHash(p('sibling.qcow2'))).not.toBe(sibling);
  });

  it('interrupted after each step (cancel): everything reads as before; the rerun (and its plan) finishes the job', async () => {
    for (const stopAt of ['committed', 'journal written', 'rebased', 'deleted']) {
      const dir = join(t.dir, `cancel-${stopAt.replace(/\W/g, '-')}`);
      buildChain(dir);
      const p = (n: string) => join(dir, n);
      const tops = ['top1.qcow2', 'other/top2.qcow2'];
      const before = tops.map((f) => guestHash(p(f)));
      const ac = new AbortController();
      const log = (line: string) => { if (line.startsWith(stopAt)) ac.abort(); };
      await expect(merge({ signal: ac.signal, log }, p('mid.qcow2'), { folders: [p('other')] })).rejects.toBeInstanceOf(CancelledError);
      expect(tops.map((f) => guestHash(p(f))), stopAt).toEqual(before);
      const dry = await strata('merge', '--dry-run', '--folder', p('other'), p('mid.qcow2'));
      expect(dry.code, `${stopAt}: ${dry.out}`).toBe(0);
      if (stopAt !== 'committed') expect(dry.out, stopAt).toMatch(/interrupted merge|Finish merging/);
      const r = await strata('merge', '--folder', p('other'), p('mid.qcow2'));
      expect({ stopAt, code: r.code, err: r.err }).toEqual({ stopAt, code: 0, err: '' });
      expect(existsSync(p('mid.qcow2'))).toBe(false);
      expect(existsSync(mergeJournalPath(p('mid.qcow2')))).toBe(false);
      expect(tops.map((f) => guestHash(p(f))), stopAt).toEqual(before);
      expect(backingChain(p('top1.qcow2'))).toEqual([p('top1.qcow2'), p('base.qcow2')]);
    }
  });

  describe_kill();

  function describe_kill(): void {
    const KILLS = 12;
    const proto = join(t.dir, 'kill-proto');
    let before: string[] = [];
    const tops = ['top1.qcow2', 'other/top2.qcow2'];
    beforeAll(() => {
      ensureBuilt();
      // 32 MiB, the layer full of data (the commit is what takes time), both children writing.
      const p = (n: string) => join(proto, n);
      mkdirSync(p('other'), { recursive: true });
      qemuImg('create', '-q', '-f', 'qcow2', p('base.qcow2'), '32M');
      qemuIo(p('base.qcow2'), ['write -P 0x11 0 24M']);
      qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', p('mid.qcow2'));
      qemuIo(p('mid.qcow2'), ['write -P 0x25 0 32M', 'write -z 20M 2M']);
      qemuImg('create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', p('top1.qcow2'));
      qemuIo(p('top1.qcow2'), ['write -P 0x31 10M 1M']);
      qemuImg('create', '-q', '-f', 'qcow2', '-b', '../mid.qcow2', '-F', 'qcow2', p('other/top2.qcow2'));
      qemuIo(p('other/top2.qcow2'), ['write -P 0x32 21M 1M']);
      before = tops.map((f) => guestHash(join(proto, f)));
    });

    /**
     * Runs the real CLI in `dir`; SIGKILLs it `killAfterMs` after the start, or (afterJournal)
     * that long after the journal appears: the steps after the commit take milliseconds, and
     * only a kill timed from there lands in them.
     */
    function run(dir: string, killAfterMs?: number, afterJournal = false): Promise<{ code: number | null; signal: NodeJS.Signals | null; ms: number; stderr: string }> {
      return new Promise((resolve, reject) => {
        const t0 = Date.now();
        const child = spawn(process.execPath, [join(repoRoot, 'bin', 'strata.cjs'), 'merge', '--folder', 'other', 'mid.qcow2'], { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
        let stderr = '';
        child.stderr!.on('data', (d: Buffer) => { stderr += d.toString(); });
        let timer: NodeJS.Timeout | null = null;
        const kill = () => { timer = setTimeout(() => child.kill('SIGKILL'), killAfterMs); };
        const watcher = afterJournal ? watch(dir, (_e, name) => { if (name === '.mid.qcow2.strata-merge' && !timer) kill(); }) : null;
        if (killAfterMs !== undefined && !afterJournal) kill();
        child.on('error', reject);
        child.on('exit', (code, signal) => {
          if (timer) clearTimeout(timer);
          watcher?.close();
          resolve({ code, signal, ms: Date.now() - t0, stderr });
        });
      });
    }

    /** Every image there checks clean but for leaks (unless only content is asked); the children read as before. */
    function verify(dir: string, what: string, contentOnly = false): void {
      for (const f of contentOnly ? [] : ['base.qcow2', 'mid.qcow2', ...tops]) {
        if (!existsSync(join(dir, f))) continue;
        const c = qemuCheck(join(dir, f));
        expect({ what, f, status: c.status === 3 ? 0 : c.status, corruptions: c.json.corruptions ?? 0 }).toEqual({ what, f, status: 0, corruptions: 0 });
      }
      expect({ what, content: tops.map((f) => guestHash(join(dir, f))) }).toEqual({ what, content: before });
    }

    it(`SIGKILLed at ${KILLS} random moments: the children always read as before, and a rerun finishes`, async () => {
      const clean = join(t.dir, 'kill-clean');
      cpSync(proto, clean, { recursive: true });
      const full = await run(clean);
      expect({ code: full.code, stderr: full.stderr }).toEqual({ code: 0, stderr: '' });
      verify(clean, 'uncrashed');
      const typical = full.ms;
      const r = rng(77);
      const log: string[] = [];
      for (let i = 0; i < KILLS; i++) {
        const dir = join(t.dir, `kill-${i}`);
        cpSync(proto, dir, { recursive: true });
        // Half anywhere in the run (mostly the commit), half just after the journal appears
        // (the rebases, the deletes).
        const late = i % 2 === 1;
        const delay = late ? Math.round(r() * 30) : Math.round(10 + r() * typical);
        const o = await run(dir, delay, late);
        const stage = !existsSync(join(dir, 'mid.qcow2')) ? (existsSync(mergeJournalPath(join(dir, 'mid.qcow2'))) ? 'layer deleted' : 'done')
          : existsSync(mergeJournalPath(join(dir, 'mid.qcow2'))) ? 'journal' : 'committing';
        if (o.signal === null) expect({ i, code: o.code, stderr: o.stderr }).toEqual({ i, code: 0, stderr: '' });
        verify(dir, `killed after ${delay} ms (#${i}, ${stage})`);
        // Killed after the last step (before the process exited): nothing left to finish.
        if (stage !== 'done') {
          const again = await run(dir);
          expect({ i, code: again.code, stderr: again.stderr }).toEqual({ i, code: 0, stderr: '' });
          verify(dir, `rerun after kill #${i}`, true);
        }
        expect(existsSync(join(dir, 'mid.qcow2'))).toBe(false);
        expect(existsSync(mergeJournalPath(join(dir, 'mid.qcow2')))).toBe(false);
        expect(backingChain(join(dir, 'other/top2.qcow2'))).toEqual([join(dir, 'other/top2.qcow2'), `${dir}/other/../base.qcow2`]);
        log.push(`${late ? 'journal+' : ''}${delay}ms:${o.signal ? stage : 'finished'}`);
      }
      console.log(`[merge kill] uncrashed run ${typical} ms; kills: ${log.join(', ')}`);
    });
  }
});
