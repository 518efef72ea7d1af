#!/usr/bin/env node
// CPU profile of the strata side of one benchmark pair: runs it once under `node --cpu-prof`
// (same warm page cache as bench/run.mjs) and prints the functions with the most self time,
// mapped back to core/ and cli/ sources through the bundle's source map.
//   node bench/profile.mjs [SCENARIO] [--pair N|LABEL] [--top N] [--interval US] [--build] [--work DIR]
// Keeps bench/out/prof/<scenario>.cpuprofile (open it in Chrome DevTools or speedscope) and
// writes bench/out/prof/<scenario>.txt.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { SourceMap } from 'node:module';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { ensureSetup, loadScenarios } from './lib/harness.mjs';
import { prepareEngine } from './lib/engine.mjs';
import { removeFiles, syncAll, warmFile } from './lib/util.mjs';

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
    build: { type: 'boolean', default: false },
    work: { type: 'string' },
  },
});

const all = await loadScenarios(join(benchDir, 'scenarios'));
const name = positionals[0] ?? 'convert-raw';
const scenario = all.find((s) => s.name === name);
if (!scenario) { log(`profile: unknown scenario ${name}`); process.exit(2); }
const engine = await prepareEngine(root, outDir, { build: values.build, log });
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
syncAll();
for (const f of scenario.inputs ? scenario.inputs(dir) : []) warmFile(f);
const t0 = performance.now();
const r = spawnSync(process.execPath, [
  '--cpu-prof', `--cpu-prof-dir=${profDir}`, `--cpu-prof-name=${profName}`, `--cpu-prof-interval=${values.interval}`,
  engine.path, ...pair.strata,
], { stdio: ['ignore', 'ignore', 'inherit'] });
const wallMs = performance.now() - t0;
removeFiles(pair.outputs?.strata ?? []);
if (r.status !== 0) { log(`profile: strata exited with ${r.status ?? r.signal}`); process.exit(1); }

const profile = JSON.parse(readFileSync(join(profDir, profName), 'utf8'));
let map = null;
if (existsSync(engine.path + '.map')) map = new SourceMap(JSON.parse(readFileSync(engine.path + '.map', 'utf8')));
const engineUrl = new URL(`file://${engine.path}`).href;

function where(cf) {
  if (!cf.url) return '(native)';
  if (cf.url === engineUrl && map && cf.lineNumber >= 0) {
    const e = map.findEntry(cf.lineNumber, cf.columnNumber);
    if (e && e.originalSource) {
      const src = e.originalSource.replace(/^file:\/\//, '');
      return `${relative(root, resolve(dirname(engine.path), src))}:${e.originalLine + 1}`;
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
lines.push(`strata ${pair.strata.join(' ')}`);
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
