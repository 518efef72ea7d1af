// Which strata build the benchmark runs. By default a copy of dist/strata.cjs (built first if
// missing) taken at the start of the run, so a concurrent `npm run build` cannot swap the engine
// between the runs of one benchmark. `--build` bundles the current sources instead (with the
// esbuild settings dist/ is built with: scripts/bundle-options.mjs) into bench/out/engine/,
// leaving the shared dist/ alone; `--ref REV` bundles core/ and cli/ as committed at REV (git
// archive into bench/out/ref-src/).
// The copy lives below the repository, so the bundle still finds node_modules/ (zstd-napi) and
// native/build/Release/strata_native.node by walking up from its own directory. Beside it
// (engine/bin/strata.cjs, engine/dist/strata.cjs: the checkout's layout) goes a copy of
// bin/strata.cjs, and the benchmark runs that launcher as a shell runs the installed `strata`
// command, so what is measured includes what the launcher does before node starts, and gets
// its own V8 code cache (dist/strata.cjs.cache) made the way `npm run build` makes it.
import { spawnSync } from 'node:child_process';
import { copyFileSync, cpSync, existsSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
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

/**
 * How the launcher starts node: the flags on its `exec node ... "$0"` line and the variables it
 * unsets, for tools that must run the bundle under node themselves (the profiler adds its own
 * flags) and still measure what the command runs.
 */
export function launcherStart(launcher) {
  const text = readFileSync(launcher, 'utf8');
  const m = /^":" \/\/;(.*)exec node (.*?)"\$0" "\$@"$/m.exec(text);
  if (!m) throw new Error(`${launcher}: no 'exec node ... "$0" "$@"' line`);
  const unset = [...m[1].matchAll(/unset ([A-Z_]+)/g)].map((u) => u[1]);
  const env = { ...process.env };
  for (const name of unset) delete env[name];
  return { nodeFlags: m[2].trim().split(/\s+/).filter(Boolean), env };
}

async function bundle(entry, engineDir) {
  const { build: esbuild } = await import('esbuild');
  const { cliBundleOptions } = await import('../../scripts/bundle-options.mjs');
  await esbuild(cliBundleOptions(entry, engineDir));
}

/**
 * Returns { path (the bundle), launcher (the bin/strata.cjs beside it: what to run), source,
 * builtAt, stale, git } for the strata build to run.
 * `ref`: bundle core/ and cli/ as committed at that git revision (extracted with git archive into
 * bench/out/ref-src/), e.g. 'HEAD' to leave out uncommitted work in the tree. The native addon
 * and node_modules are still the checkout's.
 */
export async function prepareEngine(root, outDir, { build, ref, log }) {
  const engineDir = join(outDir, 'engine', 'dist');
  rmSync(join(outDir, 'engine'), { recursive: true, force: true });
  mkdirSync(engineDir, { recursive: true });
  mkdirSync(join(outDir, 'engine', 'bin'));
  const launcher = join(outDir, 'engine', 'bin', 'strata.cjs');
  copyFileSync(join(root, 'bin', 'strata.cjs'), launcher);
  const path = join(engineDir, 'strata.cjs');
  let source;
  let refCommit = null;
  if (ref) {
    refCommit = git(root, ['rev-parse', '--short', `${ref}^{commit}`]);
    if (!refCommit) throw new Error(`--ref ${ref}: not a commit`);
    const src = join(outDir, 'ref-src');
    rmSync(src, { recursive: true, force: true });
    mkdirSync(src, { recursive: true });
    const r = spawnSync('sh', ['-c', `git archive --format=tar ${refCommit} core cli | tar -x -C "${src}"`], { cwd: root, stdio: ['ignore', 'ignore', 'pipe'], encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`--ref ${ref}: git archive failed: ${r.stderr}`);
    await bundle(join(src, 'cli/main.ts'), engineDir);
    source = `git ${refCommit} (bench --ref ${ref})`;
  } else if (build) {
    await bundle(join(root, 'cli/main.ts'), engineDir);
    source = 'sources (bench --build)';
  } else {
    const dist = join(root, 'dist', 'strata.cjs');
    if (!existsSync(dist)) {
      log('bench: dist/strata.cjs is missing; running node scripts/build.mjs');
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
    source = 'dist/strata.cjs';
  }
  // The app's renderer, for the benchmarks of browser mode (strata serve finds it beside the bundle).
  if (existsSync(join(root, 'dist', 'renderer'))) cpSync(join(root, 'dist', 'renderer'), join(engineDir, 'renderer'), { recursive: true });
  // Its own V8 code cache, as `npm run build` makes one for dist/ (scripts/code-cache.mjs).
  const { warmCodeCache } = await import('../../scripts/code-cache.mjs');
  warmCodeCache(launcher, log);
  const builtAt = statSync(path).mtimeMs;
  const stale = !build && !ref && newestSourceMtime(root) > statSync(join(root, 'dist', 'strata.cjs')).mtimeMs;
  if (stale) log('bench: note: dist/strata.cjs is older than some core/ or cli/ sources (use --build to bundle the current sources)');
  const dirty = git(root, ['status', '--porcelain', '--', 'core', 'cli']);
  return {
    path,
    launcher,
    source,
    builtAt: new Date(builtAt).toISOString(),
    staleVsSources: stale,
    git: { head: git(root, ['rev-parse', '--short', 'HEAD']), ref: refCommit, sourcesDirty: ref ? false : dirty === null ? null : dirty.length > 0 },
  };
}
