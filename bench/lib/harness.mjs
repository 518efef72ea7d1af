// The benchmark harness: loads scenarios, builds their (cached) inputs, runs each pair of
// commands interleaved (strata, qemu, strata, qemu, ...) from the same page-cache state and
// summarizes medians.
//
// A scenario is a module under bench/scenarios/ whose default export is
//   {
//     name: 'convert-raw',                 // what `node bench/run.mjs NAME` selects
//     description: '...',
//     cacheKey: 'v1-...',                  // change it when setup() changes
//     goals?: { ratio?: 1.2, strataRssMiB?: 200, strataS?: 1 },  // strataS: strata median, seconds
//     async setup(dir, { log }),           // build inputs in dir; only runs when not cached
//     inputs?(dir) => (string | { path, warm(path) })[],  // read into the page cache before each
//                                          // run (whole file, or only what warm() reads)
//     pairs(dir, work, { engine }) => [{   // or a plain array; engine.launcher runs strata
//       label: 'convert -O raw',
//       strata: ['convert', ...],          // argv after `node strata.mjs`, or { cmd, argv } for
//                                          // another command of ours (the app's job host)
//       qemu: { cmd: 'qemu-img', argv: [...] },
//       outputs: { strata: [paths], qemu: [paths] },  // deleted before each run of that side
//       async prepare?(side),              // untimed, before each run of that side ('strata'|'qemu'),
//                                          // after its outputs are deleted: fresh copies, new images
//       inputs?: [...],                    // replaces the scenario's inputs for this pair
//       reps?: N,                          // caps --reps for this pair (very slow pairs)
//       goals?: { ... },                 // overrides the scenario's goals for this pair
//       selfTimed?: ['strata'],            // these sides time themselves: their wall time is the
//                                          // BENCH_WALL_S=<seconds> line they print on stderr
//       sideNames?: { strata, qemu },      // what each side is, for the report (default strata, qemu)
//     }],
//     async check?(dir, work, pair, { strata(argv) }),  // once per pair after the warm-up, both
//                                          // outputs present; throw on mismatch. strata(argv) runs the
//                                          // benchmarked strata build, resolves its stdout
//     notes?(results) => string[],         // extra report lines from this scenario's pair results
//   }
import { existsSync, mkdirSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, loadavg } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { measure } from './measure.mjs';
import { allocatedBytes, exec, median, removeFiles, syncAll, warmFile } from './util.mjs';

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

/** Reads the inputs into the page cache: whole files, or what an entry's own warm() reads. */
export function warmInputs(inputs) {
  for (const f of inputs) {
    if (typeof f === 'string') warmFile(f);
    else f.warm(f.path);
  }
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
export async function runPair({ scenario, dir, work, pair, engine, rssMethod, reps, warmup, check, log, budgetS = 0 }) {
  const repsAsked = reps;
  const inputs = pair.inputs ?? (scenario.inputs ? scenario.inputs(dir) : []);
  if (pair.reps != null && pair.reps < reps) {
    log(`  ${pair.reps} reps for this pair (capped by the scenario)`);
    reps = pair.reps;
  }
  const sides = {
    strata: Array.isArray(pair.strata)
      ? { cmd: engine.launcher, argv: pair.strata, outputs: pair.outputs?.strata ?? [] }
      : { cmd: pair.strata.cmd, argv: pair.strata.argv, outputs: pair.outputs?.strata ?? [] },
    qemu: { cmd: pair.qemu.cmd, argv: pair.qemu.argv, outputs: pair.outputs?.qemu ?? [] },
  };
  const runSide = async (name, keep = false) => {
    const s = sides[name];
    removeFiles(s.outputs);
    if (pair.prepare) await pair.prepare(name);
    syncAll();
    warmInputs(inputs);
    const m = await measure(rssMethod, s.cmd, s.argv);
    if (m.code !== 0) {
      throw new Error(`${scenario.name} / ${pair.label}: ${name} failed (${m.signal ?? `exit ${m.code}`}): ${[s.cmd, ...s.argv].join(' ')}\n${m.stderr.trim()}`);
    }
    if (pair.selfTimed?.includes(name)) {
      const t = /BENCH_WALL_S=([\d.]+)/.exec(m.stderr);
      if (!t) throw new Error(`${scenario.name} / ${pair.label}: ${name} printed no BENCH_WALL_S line`);
      m.processWallS = m.wallS;
      m.wallS = Number(t[1]);
    }
    const outBytes = s.outputs.map(allocatedBytes);
    if (!keep) { removeFiles(s.outputs); syncAll(); }
    return { ...m, stderr: undefined, outputAllocatedBytes: outBytes };
  };

  // A mismatch is reported in the table (check: FAILED) rather than ending the whole run.
  const runCheck = async () => {
    try {
      await scenario.check(dir, work, pair, { strata: (argv) => exec(engine.launcher, argv) });
      log('  check passed');
      return 'passed';
    } catch (err) {
      log(`  CHECK FAILED: ${err.message}`);
      return `FAILED: ${err.message.split('\n')[0]}`;
    }
  };

  const loadStart = loadavg()[0];
  if (loadStart > cpus().length / 2) log(`  note: load average ${loadStart.toFixed(1)} on ${cpus().length} CPUs; other work on this machine adds noise`);
  let checkResult = check && scenario.check ? 'pending' : 'skipped';
  const warm = [];
  let roundS = null;
  for (let i = 0; i < warmup; i++) {
    const t0 = performance.now();
    const a = await runSide('strata', true);
    const b = await runSide('qemu', true);
    warm.push({ strata: a, qemu: b });
    roundS = (performance.now() - t0) / 1000;
    log(`  warm-up ${i + 1}/${warmup}: strata ${fmtRun(a)} | qemu ${fmtRun(b)}`);
    if (i === 0 && checkResult === 'pending') checkResult = await runCheck();
    removeFiles([...sides.strata.outputs, ...sides.qemu.outputs]);
    syncAll();
  }
  // Time budget: when one round (both sides, with their preparation) is so slow that `reps`
  // rounds would take longer than budgetS, run fewer: the largest odd count that fits, at least 3.
  if (budgetS > 0 && roundS != null && reps > 3 && reps * roundS > budgetS) {
    let n = Math.max(3, Math.floor(budgetS / roundS));
    if (n % 2 === 0) n -= 1;
    if (n < reps) {
      log(`  one round takes ${roundS.toFixed(0)} s: ${n} reps instead of ${reps} (--budget ${budgetS})`);
      reps = n;
    }
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
    checkResult = await runCheck();
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
    strataS: goals.strataS == null || summary.strataMedianS == null ? null : summary.strataMedianS <= goals.strataS,
  };
  return {
    scenario: scenario.name,
    label: pair.label,
    commands: { strata: Array.isArray(pair.strata) ? ['strata', ...pair.strata].join(' ') : [pair.strata.cmd, ...pair.strata.argv].join(' '), qemu: [pair.qemu.cmd, ...pair.qemu.argv].join(' ') },
    sideNames: pair.sideNames ?? { strata: 'strata', qemu: 'qemu-img' },
    check: checkResult,
    reps,
    repsAsked,
    goals,
    verdict,
    summary,
    runs,
    warmup: warm,
  };
}
