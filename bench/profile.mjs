#!/usr/bin/env node
// CPU profile of the strata side of one benchmark pair: runs it once under `node --cpu-prof`
// (same warm page cache as bench/run.mjs) and prints the functions with the most self time,
// mapped back to core/ and cli/ sources through the bundle's source map.
//   node bench/profile.mjs [SCENARIO] [--pair N|LABEL] [--top N] [--interval US] [--perf] [--build | --ref REV] [--work DIR]
// Keeps bench/out/prof/<scenario>.cpuprofile (open it in Chrome DevTools or speedscope) and
// writes bench/out/prof/<scenario>.txt.
// --perf: afterwards runs the strata side once more under `perf record -g` (node
// --perf-basic-prof, so JIT-compiled JS functions have names), prints the top of
// `perf report --no-children --sort sym` with bundle lines mapped to core/ and cli/ sources, and
// keeps bench/out/prof/<scenario>.perf.data and <scenario>.perf.txt. Shows what the CPU-profile
// cannot: kernel time (syscalls, page cache copies, page faults), libuv threadpool threads, GC.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { SourceMap } from 'node:module';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { ensureSetup, loadScenarios, warmInputs } from './lib/harness.mjs';
import { launcherStart, prepareEngine } from './lib/engine.mjs';
import { removeFiles, syncAll } from './lib/util.mjs';

const benchDir = dirname(fileURLToPath(import.meta.url));
const root = resolve(benchDir, '..');
const outDir = join(benchDir, 'out');
const log = (m) => process.stderr.write(m + '\n');

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    pair: { type: 'string', default: '0' },
    top: { type: 'string', default: '25' },
    interval: { type: 'string', default: '250' },
    perf: { type: 'boolean', default: false },
    build: { type: 'boolean', default: false },
    ref: { type: 'string' },
    work: { type: 'string' },
  },
});

const all = await loadScenarios(join(benchDir, 'scenarios'));
const name = positionals[0] ?? 'convert-raw';
const scenario = all.find((s) => s.name === name);
if (!scenario) { log(`profile: unknown scenario ${name}`); process.exit(2); }
const engine = await prepareEngine(root, outDir, { build: values.build, ref: values.ref, log });
// node started as the `strata` command starts it (flags, environment), plus the profiler's flags.
const start = launcherStart(engine.launcher);
const { dir } = await ensureSetup(scenario, join(outDir, 'cache'), log);
const work = join(values.work ? resolve(values.work) : join(outDir, 'work'), scenario.name);
mkdirSync(work, { recursive: true });
const pairs = typeof scenario.pairs === 'function' ? scenario.pairs(dir, work) : scenario.pairs;
const pair = pairs[Number(values.pair)] ?? pairs.find((p) => p.label === values.pair);
if (!pair) { log(`profile: no pair ${values.pair}`); process.exit(2); }

const profDir = join(outDir, 'prof');
mkdirSync(profDir, { recursive: true });
const profName = `${scenario.name}.cpuprofile`;
rmSync(join(profDir, profName), { force: true });
removeFiles(pair.outputs?.strata ?? []);
if (pair.prepare) await pair.prepare('strata');
syncAll();
warmInputs(pair.inputs ?? (scenario.inputs ? scenario.inputs(dir) : []));
const t0 = performance.now();
const r = spawnSync(process.execPath, [
  ...start.nodeFlags, '--cpu-prof', `--cpu-prof-dir=${profDir}`, `--cpu-prof-name=${profName}`, `--cpu-prof-interval=${values.interval}`,
  engine.path, ...pair.strata,
], { stdio: ['ignore', 'ignore', 'inherit'], env: start.env });
const wallMs = performance.now() - t0;
removeFiles(pair.outputs?.strata ?? []);
if (r.status !== 0) { log(`profile: strata exited with ${r.status ?? r.signal}`); process.exit(1); }

const profile = JSON.parse(readFileSync(join(profDir, profName), 'utf8'));
let map = null;
if (existsSync(engine.path + '.map')) map = new SourceMap(JSON.parse(readFileSync(engine.path + '.map', 'utf8')));
const engineUrl = new URL(`file://${engine.path}`).href;

/** core/... or cli/... for a source-map path (a --ref build's sources are in bench/out/ref-src/). */
function srcName(src) {
  return relative(root, resolve(dirname(engine.path), src)).replace(/^bench\/out\/ref-src\//, '');
}

function where(cf) {
  if (!cf.url) return '(native)';
  if (cf.url === engineUrl && map && cf.lineNumber >= 0) {
    const e = map.findEntry(cf.lineNumber, cf.columnNumber);
    if (e && e.originalSource) {
      const src = e.originalSource.replace(/^file:\/\//, '');
      return `${srcName(src)}:${e.originalLine + 1}`;
    }
  }
  if (cf.url.startsWith('node:')) return cf.url;
  return `${cf.url.replace(/^file:\/\//, '').replace(root + '/', '')}:${cf.lineNumber + 1}`;
}

// Self time per node: each sample lasts until the next one (timeDeltas[i + 1]).
const byId = new Map(profile.nodes.map((n) => [n.id, n]));
const selfUs = new Map();
const { samples, timeDeltas } = profile;
for (let i = 0; i < samples.length; i++) {
  const dt = i + 1 < timeDeltas.length ? timeDeltas[i + 1] : 0;
  selfUs.set(samples[i], (selfUs.get(samples[i]) ?? 0) + dt);
}
const totalUs = profile.endTime - profile.startTime;
const byFn = new Map();
const byFile = new Map();
for (const [id, us] of selfUs) {
  const cf = byId.get(id).callFrame;
  const loc = where(cf);
  const key = `${cf.functionName || '(anonymous)'}  ${loc}`;
  byFn.set(key, (byFn.get(key) ?? 0) + us);
  const file = cf.functionName.startsWith('(') && !cf.url ? cf.functionName : loc.replace(/:\d+$/, '');
  byFile.set(file, (byFile.get(file) ?? 0) + us);
}
const top = Number(values.top);
const pct = (us) => `${((100 * us) / totalUs).toFixed(1).padStart(5)}%`;
const ms = (us) => `${(us / 1000).toFixed(0).padStart(6)} ms`;
const lines = [];
const shown = pair.strata.join(' ');
lines.push(`strata ${shown.length > 300 ? `${shown.slice(0, 300)} ... (${pair.strata.length} arguments)` : shown}`);
lines.push(`wall ${(wallMs / 1000).toFixed(2)} s, profiled ${(totalUs / 1e6).toFixed(2)} s on the main thread, ${samples.length} samples every ${values.interval} us`);
lines.push('');
lines.push(`top ${top} functions by self time (main JS thread; "(idle)" = waiting for I/O in libuv's threadpool):`);
for (const [k, us] of [...byFn].sort((a, b) => b[1] - a[1]).slice(0, top)) lines.push(`${ms(us)} ${pct(us)}  ${k}`);
lines.push('');
lines.push('self time by source file:');
for (const [k, us] of [...byFile].sort((a, b) => b[1] - a[1]).slice(0, 15)) lines.push(`${ms(us)} ${pct(us)}  ${k}`);
const text = lines.join('\n') + '\n';
writeFileSync(join(profDir, `${scenario.name}.txt`), text);
process.stdout.write(text);
log(`profile: ${relative(root, join(profDir, profName))} (open in Chrome DevTools > Performance, or speedscope)`);

if (values.perf) {
  const data = join(profDir, `${scenario.name}.perf.data`);
  removeFiles(pair.outputs?.strata ?? []);
  if (pair.prepare) await pair.prepare('strata');
  syncAll();
  warmInputs(pair.inputs ?? (scenario.inputs ? scenario.inputs(dir) : []));
  const p = spawnSync('perf', ['record', '-g', '-F', '999', '-o', data, '--', process.execPath, ...start.nodeFlags, '--perf-basic-prof', engine.path, ...pair.strata],
    { stdio: ['ignore', 'ignore', 'inherit'], env: start.env });
  removeFiles(pair.outputs?.strata ?? []);
  if (p.error || p.status !== 0) { log(`profile: perf record failed (${p.error?.message ?? `exit ${p.status}`})`); process.exit(1); }
  const rep = spawnSync('perf', ['report', '-i', data, '--no-children', '--sort', 'sym', '--stdio', '-g', 'none', '--percent-limit', '0.3'],
    { encoding: 'utf8', maxBuffer: 256 << 20 });
  if (rep.status !== 0) { log(`profile: perf report failed: ${rep.stderr}`); process.exit(1); }
  // JIT frames are named like "LazyCompile:*name /.../strata.cjs:LINE:COL" (1-based).
  const mapped = rep.stdout.split('\n').filter((l) => /^\s+\d+\.\d+%/.test(l)).slice(0, top).map((l) => l.replace(/(?:file:\/\/)?\/\S*?strata\.cjs:(\d+):(\d+)/, (m, line, col) => {
    const e = map?.findEntry(Number(line) - 1, Number(col) - 1);
    if (!e || !e.originalSource) return m;
    return `${srcName(e.originalSource.replace(/^file:\/\//, ''))}:${e.originalLine + 1}`;
  }));
  const ptext = [`perf record -g (999 Hz, all threads) of strata ${lines[0].slice(7)}`, 'perf report --no-children --sort sym (self time; [k] kernel, [.] user):', ...mapped].join('\n') + '\n';
  writeFileSync(join(profDir, `${scenario.name}.perf.txt`), ptext);
  process.stdout.write('\n' + ptext);
  log(`profile: ${relative(root, data)} (perf report -i ... for more)`);
}
