// The build outputs the tests need, made fresh when their sources changed.
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const repoRoot = join(dirname(fileURLToPath(import.meta.url)), '..');

function newestMtime(dir: string): number {
  let t = 0;
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) t = Math.max(t, newestMtime(p));
    else if (/\.(ts|tsx|css|html)$/.test(e.name)) t = Math.max(t, statSync(p).mtimeMs);
  }
  return t;
}

/** The build outputs and the sources each is made from. */
const OUTPUTS: [string, string[]][] = [
  ['dist/strata.cjs', ['cli', 'core', 'main']],
  ['dist/renderer/index.html', ['renderer', 'core/protocol', 'core/library']],
  ['dist/electron/main.cjs', ['main', 'core']],
];

/** True when some build output is missing or older than its sources. */
export function buildIsStale(): boolean {
  return OUTPUTS.some(([out, srcs]) => {
    const p = join(repoRoot, out);
    return !existsSync(p) || statSync(p).mtimeMs < Math.max(...srcs.map((d) => newestMtime(join(repoRoot, d))));
  });
}

/**
 * Builds everything (scripts/build.mjs) when an output is missing or stale. The test run's
 * global setup does this once before any test; here it is only a safety net.
 */
export function ensureBuilt(): void {
  if (!buildIsStale()) return;
  const r = spawnSync(process.execPath, [join(repoRoot, 'scripts', 'build.mjs')], { cwd: repoRoot, encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`node scripts/build.mjs failed (${r.status}): ${r.stderr}`);
}

