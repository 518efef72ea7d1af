#!/usr/bin/env node
// Side-by-side benchmarks of strata against qemu-img: `npm run bench -- [scenario...] [options]`.
// See bench/README.md.
import { spawnSync } from 'node:child_process';
import { cpus, release, totalmem } from 'node:os';
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { ensureSetup, loadScenarios, runPair } from './lib/harness.mjs';
import { chooseRssMethod, RSS_METHOD_DESCRIPTION } from './lib/measure.mjs';
import { prepareEngine } from './lib/engine.mjs';

const benchDir = dirname(fileURLToPath(import.meta.url));
const root = resolve(benchDir, '..');
const outDir = join(benchDir, 'out');

const USAGE = `usage: node bench/run.mjs [SCENARIO...] [--reps N] [--warmup N] [--budget S] [--no-check] [--build | --ref REV] [--work DIR] [--list]

  SCENARIO     names under bench/scenarios/ (default: all)
  --reps N     timed strata/qemu pairs per benchmark, interleaved (default 5)
  --warmup N   untimed pairs first; the first one also runs the scenario's check (default 1)
  --budget S   per benchmark pair: when the warm-up round says N reps would take longer than
               S seconds, run fewer (the largest odd number that fits, at least 3); 0 = never
               (default 150)
  --no-check   skip the output comparison
  --build      bundle the current core/ and cli/ sources into bench/out/engine instead of
               using a copy of dist/strata.cjs
  --ref REV    bundle core/ and cli/ as committed at git revision REV (e.g. HEAD: without the
               uncommitted changes in the tree)
  --work DIR   where outputs are written (default bench/out/work); e.g. /dev/shm takes the
               disk out of the measurement and leaves the engine's own cost
  --list       list scenarios and exit
Writes bench/out/results.json (and bench/out/history/<time>.json).`;

const log = (m) => process.stderr.write(m + '\n');

function main() {
  let parsed;
  try {
    parsed = parseArgs({
      allowPositionals: true,
      options: {
        reps: { type: 'string', default: '5' },
        warmup: { type: 'string', default: '1' },
        budget: { type: 'string', default: '150' },
        'no-check': { type: 'boolean', default: false },
        build: { type: 'boolean', default: false },
        ref: { type: 'string' },
        list: { type: 'boolean', default: false },
        work: { type: 'string' },
        help: { type: 'boolean', short: 'h', default: false },
      },
    });
  } catch (err) {
    log(`bench: ${err.message}\n${USAGE}`);
    return Promise.resolve(2);
  }
  return run(parsed);
}

async function run({ values, positionals }) {
  if (values.help) { process.stdout.write(USAGE + '\n'); return 0; }
  const reps = Number(values.reps);
  const warmup = Number(values.warmup);
  const budgetS = Number(values.budget);
  if (!Number.isInteger(reps) || reps < 1 || !Number.isInteger(warmup) || warmup < 0 || !(budgetS >= 0)) {
    log(`bench: --reps must be >= 1, --warmup >= 0 and --budget >= 0\n${USAGE}`);
    return 2;
  }
  const all = await loadScenarios(join(benchDir, 'scenarios'));
  if (values.list) {
    for (const s of all) process.stdout.write(`${s.name.padEnd(20)} ${s.description ?? ''}\n`);
    return 0;
  }
  const unknown = positionals.filter((n) => !all.some((s) => s.name === n));
  if (unknown.length) { log(`bench: unknown scenario(s) ${unknown.join(', ')}; have: ${all.map((s) => s.name).join(', ')}`); return 2; }
  const selected = positionals.length ? all.filter((s) => positionals.includes(s.name)) : all;

  mkdirSync(outDir, { recursive: true });
  const engine = await prepareEngine(root, outDir, { build: values.build, ref: values.ref, log });
  const rssMethod = chooseRssMethod(log);
  log(`bench: engine ${engine.source} (checkout at git ${engine.git.head}${engine.git.sourcesDirty ? ', core/cli modified' : ''}); RSS via ${RSS_METHOD_DESCRIPTION[rssMethod]}; ${reps} reps + ${warmup} warm-up`);

  const results = [];
  const notes = [];
  const setups = {};
  for (const scenario of selected) {
    const { dir, setupS } = await ensureSetup(scenario, join(outDir, 'cache'), log);
    setups[scenario.name] = { dir, setupS };
    const work = join(values.work ? resolve(values.work) : join(outDir, 'work'), scenario.name);
    mkdirSync(work, { recursive: true });
    const pairs = typeof scenario.pairs === 'function' ? scenario.pairs(dir, work, { engine }) : scenario.pairs;
    const mine = [];
    for (const pair of pairs) {
      log(`${scenario.name} / ${pair.label}`);
      try {
        mine.push(await runPair({ scenario, dir, work, pair, engine, rssMethod, reps, warmup, budgetS, check: !values['no-check'], log }));
      } catch (err) {
        // One failing command does not cost the other scenarios their results.
        log(`  ERROR: ${err.message}`);
        mine.push({ scenario: scenario.name, label: pair.label, error: err.message, check: 'error', goals: {}, verdict: {}, summary: null, runs: [] });
      }
    }
    results.push(...mine);
    if (scenario.notes) {
      try {
        notes.push(...scenario.notes(mine).map((l) => `${scenario.name}: ${l}`));
      } catch (err) {
        log(`  notes: ${err.message}`);
      }
    }
  }

  const qemuVersion = spawnSync('qemu-img', ['--version'], { encoding: 'utf8' }).stdout?.split('\n')[0] ?? null;
  const report = {
    date: new Date().toISOString(),
    host: { cpus: cpus().length, cpuModel: cpus()[0]?.model ?? null, memGiB: +(totalmem() / 2 ** 30).toFixed(1), kernel: release(), node: process.version, qemuImg: qemuVersion },
    engine,
    rssMethod,
    rssMethodDescription: RSS_METHOD_DESCRIPTION[rssMethod],
    reps,
    warmup,
    budgetS,
    workDir: values.work ? resolve(values.work) : join(outDir, 'work'),
    setups,
    results,
    notes,
  };
  const json = JSON.stringify(report, null, 2) + '\n';
  writeFileSync(join(outDir, 'results.json'), json);
  mkdirSync(join(outDir, 'history'), { recursive: true });
  writeFileSync(join(outDir, 'history', report.date.replace(/[:.]/g, '-') + '.json'), json);

  process.stdout.write('\n' + table(results) + '\n');
  if (notes.length) process.stdout.write('\n' + notes.join('\n') + '\n');
  for (const r of results.filter((x) => x.error)) process.stdout.write(`\nERROR ${r.scenario} / ${r.label}: ${r.error}\n`);
  process.stdout.write(`\nn = timed interleaved pairs (strata, qemu); ratio = median over them of strata/qemu wall time; RSS = ${RSS_METHOD_DESCRIPTION[rssMethod]}, max over reps.\n`);
  const busy = results.filter((r) => r.summary && Math.max(r.summary.loadAvg1.start, r.summary.loadAvg1.end) > r.summary.loadAvg1.cpus / 2);
  if (busy.length) process.stdout.write(`note: the machine was busy (1-min load average up to ${Math.max(...busy.flatMap((r) => [r.summary.loadAvg1.start, r.summary.loadAvg1.end])).toFixed(1)} on ${busy[0].summary.loadAvg1.cpus} CPUs); rerun when it is quiet for stable numbers.\n`);
  process.stdout.write(`wrote ${join('bench', 'out', 'results.json')}\n`);
  return 0;
}

function table(results) {
  const f = (x, d = 2) => (x == null || Number.isNaN(x) ? '-' : x.toFixed(d));
  const goal = (ok, target) => (ok == null ? '' : `${ok ? 'ok' : 'MISS'} (${target})`);
  const head = ['scenario', 'pair', 'n', 'strata s', 'qemu s', 'ratio', 'time goals', 'strata RSS MiB', 'RSS goal', 'qemu RSS MiB', 'strata cpu s', 'qemu cpu s', 'check'];
  const rows = results.map((r) => (r.error ? [r.scenario, r.label, ...Array(head.length - 3).fill('-'), 'error'] : [
    r.scenario, r.label, r.reps, f(r.summary.strataMedianS), f(r.summary.qemuMedianS), f(r.summary.ratioMedian),
    [goal(r.verdict.ratio, `<= ${r.goals.ratio}`), goal(r.verdict.strataS, `strata <= ${r.goals.strataS} s`)].filter(Boolean).join(', '), f(r.summary.strataPeakRssMiB, 0), goal(r.verdict.strataRssMiB, `< ${r.goals.strataRssMiB}`),
    f(r.summary.qemuPeakRssMiB, 0), f(r.summary.strataCpuMedianS), f(r.summary.qemuCpuMedianS), r.check.length > 40 ? r.check.slice(0, 40) + '...' : r.check,
  ]));
  const w = head.map((h, i) => Math.max(h.length, ...rows.map((row) => String(row[i]).length)));
  const line = (cells) => cells.map((c, i) => String(c).padEnd(w[i])).join('  ').trimEnd();
  return [line(head), line(w.map((n) => '-'.repeat(n))), ...rows.map(line)].join('\n');
}

main().then((code) => { process.exitCode = code; }, (err) => {
  log(`bench: ${process.env.BENCH_DEBUG ? err.stack : err.message}`);
  process.exitCode = 1;
});
