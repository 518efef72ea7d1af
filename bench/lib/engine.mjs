// Which strata build the benchmark runs. By default a copy of dist/strata.mjs (built first if
// missing) taken at the start of the run, so a concurrent `npm run build` cannot swap the engine
// between the runs of one benchmark. `--build` bundles the current sources instead (same esbuild
// settings as scripts/build.mjs) into bench/out/engine/, leaving the shared dist/ alone.
// The copy lives below the repository, so the bundle still finds node_modules/ (zstd-napi) and
// native/build/Release/strata_native.node by walking up from its own directory.
import { spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join, relative, resolve } from 'node:path';

function newestSourceMtime(root) {
  let newest = 0;
  const walk = (dir) => {
    for (const e of readdirSync(dir, { withFileTypes: true })) {
      const p = join(dir, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.name.endsWith('.ts')) newest = Math.max(newest, statSync(p).mtimeMs);
    }
  };
  for (const d of ['core', 'cli']) if (existsSync(join(root, d))) walk(join(root, d));
  return newest;
}

function git(root, args) {
  const r = spawnSync('git', args, { cwd: root, encoding: 'utf8' });
  return r.status === 0 ? r.stdout.trim() : null;
}

/** Returns { path, source, builtAt, stale, git } for the strata bundle to run. */
export async function prepareEngine(root, outDir, { build, log }) {
  const engineDir = join(outDir, 'engine');
  mkdirSync(engineDir, { recursive: true });
  const path = join(engineDir, 'strata.mjs');
  let source;
  if (build) {
    const { build: esbuild } = await import('esbuild');
    await esbuild({
      entryPoints: { strata: join(root, 'cli/main.ts') },
      outdir: engineDir,
      outExtension: { '.js': '.mjs' },
      bundle: true,
      platform: 'node',
      format: 'esm',
      target: 'node20',
      sourcemap: true,
      external: ['zstd-napi'],
      banner: { js: "import { createRequire as __strataCreateRequire } from 'node:module'; const require = __strataCreateRequire(import.meta.url);" },
      logLevel: 'warning',
    });
    source = 'sources (bench --build)';
  } else {
    const dist = join(root, 'dist', 'strata.mjs');
    if (!existsSync(dist)) {
      log('bench: dist/strata.mjs is missing; running node scripts/build.mjs');
      const r = spawnSync(process.execPath, ['scripts/build.mjs'], { cwd: root, stdio: 'inherit' });
      if (r.status !== 0 || !existsSync(dist)) throw new Error('build failed; fix it or run `npm run build`');
    }
    copyFileSync(dist, path);
    // The map's sources are relative to dist/; rewrite them for the copy's directory.
    if (existsSync(dist + '.map')) {
      const map = JSON.parse(readFileSync(dist + '.map', 'utf8'));
      map.sources = map.sources.map((s) => relative(engineDir, resolve(root, 'dist', s)));
      writeFileSync(path + '.map', JSON.stringify(map));
    }
    source = 'dist/strata.mjs';
  }
  const builtAt = statSync(path).mtimeMs;
  const stale = !build && newestSourceMtime(root) > statSync(join(root, 'dist', 'strata.mjs')).mtimeMs;
  if (stale) log('bench: note: dist/strata.mjs is older than some core/ or cli/ sources (use --build to bundle the current sources)');
  const dirty = git(root, ['status', '--porcelain', '--', 'core', 'cli']);
  return {
    path,
    source,
    builtAt: new Date(builtAt).toISOString(),
    staleVsSources: stale,
    git: { head: git(root, ['rev-parse', '--short', 'HEAD']), sourcesDirty: dirty === null ? null : dirty.length > 0 },
  };
}
