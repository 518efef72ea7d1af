// The benchmark harness: loads scenarios, builds their (cached) inputs, runs each pair of
// commands interleaved (strata, qemu, strata, qemu, ...) from the same page-cache state and
// summarizes medians.
//
// A scenario is a module under bench/scenarios/ whose default export is
//   {
//     name: 'convert-raw',                 // what `node bench/run.mjs NAME` selects
//     description: '...',
//     cacheKey: 'v1-...',                  // change it when setup() changes
//     goals?: { ratio?: 1.2, strataRssMiB?: 200 },
//     async setup(dir, { log }),           // build inputs in dir; only runs when not cached
//     inputs?(dir) => string[],            // files to read into the page cache before each run
//     pairs(dir, work) => [{               // or a plain array
//       label: 'convert -O raw',
//       strata: ['convert', ...],          // argv after `node strata.mjs`
//       qemu: { cmd: 'qemu-img', argv: [...] },
//       outputs: { strata: [paths], qemu: [paths] },  // deleted before each run of that side
//       goals?: { ... },                 // overrides the scenario's goals for this pair
//     }],
//     async check?(dir, work, pair),       // once per pair after the warm-up, both outputs present; throw on mismatch
//   }
import { existsSync, mkdirSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, loadavg } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { measure } from './measure.mjs';
import { allocatedBytes, median, removeFiles, syncAll, warmFile } from './util.mjs';

export async function loadScenarios(dir) {
  const out = [];
  for (const f of readdirSync(dir).filter((n) => n.endsWith('.mjs')).sort()) {
    const mod = await import(pathToFileURL(join(dir, f)).href);
    const s = mod.default;
    if (!s || typeof s.name !== 'string' || typeof s.setup !== 'function' || !s.pairs) {
      throw new Error(`bench/scenarios/${f}: default export needs name, setup() and pairs`);
    }
    out.push(s);
  }
  return out;
}

/** Builds the scenario's inputs unless bench/out/cache/NAME/CACHEKEY is complete; returns that dir. */
export async function ensureSetup(scenario, cacheRoot, log) {
  const base = join(cacheRoot, scenario.name);
  const dir = join(base, String(scenario.cacheKey ?? 'default').replace(/[^\w.-]/g, '_'));
  const marker = join(dir, '.ready');
  if (existsSync(base)) {
    for (const old of readdirSync(base)) if (join(base, old) !== dir) rmSync(join(base, old), { recursive: true, force: true });
  }
  if (existsSync(marker)) { log(`${scenario.name}: using cached inputs in ${dir}`); return { dir, setupS: null }; }
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  const t0 = performance.now();
  await scenario.setup(dir, { log });
  const setupS = (performance.now() - t0) / 1000;
  writeFileSync(marker, new Date().toISOString() + '\n');
  log(`${scenario.name}: inputs built in ${setupS.toFixed(1)} s`);
  return { dir, setupS };
}

function fmtRun(m) {
  return `${m.wallS.toFixed(2)} s${m.rssKiB != null ? ` ${(m.rssKiB / 1024).toFixed(0)} MiB` : ''}`;
}

/**
 * Runs one pair: `warmup` untimed rounds (the first is followed by scenario.check), then `reps`
 * timed rounds. Before each run of either side: its outputs are deleted, `sync` writes back
 * everything dirty (the previous run's output included), and the inputs are read once so both
 * tools start from a warm page cache.
 */
export async function runPair({ scenario, dir, work, pair, engine, rssMethod, reps, warmup, check, log }) {
  const inputs = scenario.inputs ? scenario.inputs(dir) : [];
  const sides = {
    strata: { cmd: process.execPath, argv: [engine.path, ...pair.strata], outputs: pair.outputs?.strata ?? [] },
    qemu: { cmd: pair.qemu.cmd, argv: pair.qemu.argv, outputs: pair.outputs?.qemu ?? [] },
  };
  const runSide = async (name, keep = false) => {
    const s = sides[name];
    removeFiles(s.outputs);
    syncAll();
    for (const f of inputs) warmFile(f);
    const m = await measure(rssMethod, s.cmd, s.argv);
    if (m.code !== 0) {
      throw new Error(`${scenario.name} / ${pair.label}: ${name} failed (${m.signal ?? `exit ${m.code}`}): ${[s.cmd, ...s.argv].join(' ')}\n${m.stderr.trim()}`);
    }
    const outBytes = s.outputs.map(allocatedBytes);
    if (!keep) { removeFiles(s.outputs); syncAll(); }
    return { ...m, stderr: undefined, outputAllocatedBytes: outBytes };
  };

  const loadStart = loadavg()[0];
  if (loadStart > cpus().length / 2) log(`  note: load average ${loadStart.toFixed(1)} on ${cpus().length} CPUs; other work on this machine adds noise`);
  let checkResult = check && scenario.check ? 'pending' : 'skipped';
  const warm = [];
  for (let i = 0; i < warmup; i++) {
    const a = await runSide('strata', true);
    const b = await runSide('qemu', true);
    warm.push({ strata: a, qemu: b });
    log(`  warm-up ${i + 1}/${warmup}: strata ${fmtRun(a)} | qemu ${fmtRun(b)}`);
    if (i === 0 && checkResult === 'pending') {
      await scenario.check(dir, work, pair);
      checkResult = 'passed';
      log('  check passed');
    }
    removeFiles([...sides.strata.outputs, ...sides.qemu.outputs]);
    syncAll();
  }
  const runs = [];
  for (let i = 0; i < reps; i++) {
    const a = await runSide('strata');
    const b = await runSide('qemu');
    const ratio = a.wallS / b.wallS;
    runs.push({ strata: a, qemu: b, ratio });
    log(`  rep ${i + 1}/${reps}: strata ${fmtRun(a)} | qemu ${fmtRun(b)} | ratio ${ratio.toFixed(2)}`);
  }
  // A check that was asked for but had no warm-up round to run in: run it now on one more round.
  if (checkResult === 'pending') {
    await runSide('strata', true);
    await runSide('qemu', true);
    await scenario.check(dir, work, pair);
    checkResult = 'passed';
    removeFiles([...sides.strata.outputs, ...sides.qemu.outputs]);
    syncAll();
  }
  const pick = (side, key) => runs.map((r) => r[side][key]);
  const maxOf = (xs) => (xs.some((x) => x == null) ? null : Math.max(...xs));
  const mib = (k) => (k == null ? null : k / 1024);
  const summary = {
    strataMedianS: median(pick('strata', 'wallS')),
    qemuMedianS: median(pick('qemu', 'wallS')),
    ratioMedian: median(runs.map((r) => r.ratio)),
    ratioMin: Math.min(...runs.map((r) => r.ratio)),
    ratioMax: Math.max(...runs.map((r) => r.ratio)),
    strataPeakRssMiB: mib(maxOf(pick('strata', 'rssKiB'))),
    strataMedianRssMiB: mib(median(pick('strata', 'rssKiB'))),
    qemuPeakRssMiB: mib(maxOf(pick('qemu', 'rssKiB'))),
    strataCpuMedianS: median(runs.map((r) => (r.strata.userS ?? NaN) + (r.strata.sysS ?? NaN))),
    qemuCpuMedianS: median(runs.map((r) => (r.qemu.userS ?? NaN) + (r.qemu.sysS ?? NaN))),
    loadAvg1: { start: +loadStart.toFixed(2), end: +loadavg()[0].toFixed(2), cpus: cpus().length },
  };
  const goals = pair.goals ?? scenario.goals ?? {};
  const verdict = {
    ratio: goals.ratio == null || summary.ratioMedian == null ? null : summary.ratioMedian <= goals.ratio,
    strataRssMiB: goals.strataRssMiB == null || summary.strataPeakRssMiB == null ? null : summary.strataPeakRssMiB < goals.strataRssMiB,
  };
  return {
    scenario: scenario.name,
    label: pair.label,
    commands: { strata: ['strata', ...pair.strata].join(' '), qemu: [pair.qemu.cmd, ...pair.qemu.argv].join(' ') },
    check: checkResult,
    goals,
    verdict,
    summary,
    runs,
    warmup: warm,
  };
}
