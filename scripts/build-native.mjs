// Builds the optional N-API addon native/build/Release/strata_native.node (image locks, hole
// detection, hole punching, the copy loops' data path) with the node-gyp that npm bundles.
// Called from scripts/build.mjs, which is the `prepare` script, so it runs on `npm install`;
// also runnable on its own.
//
// This must never fail an install: without a compiler, node-gyp or Python, or when the build
// breaks, it prints one warning line and returns; Strata then runs without those features
// (core/io/native.ts reports why through nativeStatus()).
//
// node-gyp is NOT a dependency of ours (the registry's newest needs Node 22); we use npm's own:
//   1. $npm_config_node_gyp, which npm sets for the scripts it runs;
//   2. node-gyp inside the npm that $npm_execpath points at;
//   3. node-gyp inside the npm installed next to this Node (process.execPath);
//   4. node-gyp inside `npm prefix -g`.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const nativeDir = join(root, 'native');
const source = join(nativeDir, 'strata_native.c');
const gypFile = join(nativeDir, 'binding.gyp');
const output = join(nativeDir, 'build', 'Release', 'strata_native.node');
const logFile = join(nativeDir, 'build', 'native-build.log');
const BUILD_TIMEOUT_MS = 5 * 60_000;

function warn(reason) {
  process.stderr.write(`strata: native addon not built (${reason}); image locks, hole detection, hole punching and the native copy path are off\n`);
}

function mtime(path) {
  try { return statSync(path).mtimeMs; } catch { return -1; }
}

const NODE_GYP_IN_NPM = join('node_modules', 'node-gyp', 'bin', 'node-gyp.js');

function findNodeGyp() {
  const candidates = [];
  if (process.env.npm_config_node_gyp) candidates.push(process.env.npm_config_node_gyp);
  // npm_execpath is .../npm/bin/npm-cli.js when npm runs us.
  if (process.env.npm_execpath && /npm-cli\.js$/.test(process.env.npm_execpath)) {
    candidates.push(join(dirname(process.env.npm_execpath), '..', NODE_GYP_IN_NPM));
  }
  const binDir = dirname(process.execPath);
  candidates.push(join(binDir, '..', 'lib', 'node_modules', 'npm', NODE_GYP_IN_NPM)); // Unix layout
  candidates.push(join(binDir, 'node_modules', 'npm', NODE_GYP_IN_NPM)); // Windows layout
  for (const c of candidates) if (existsSync(c)) return c;
  // Last resort: ask npm where its global prefix is (npm may live elsewhere, e.g. nvm/volta).
  const npmCmd = process.platform === 'win32' ? 'npm.cmd' : 'npm';
  const r = spawnSync(npmCmd, ['prefix', '-g'], { encoding: 'utf8', timeout: 30_000, shell: process.platform === 'win32' });
  const prefix = r.status === 0 ? r.stdout.trim() : '';
  if (prefix) {
    for (const c of [join(prefix, 'lib', 'node_modules', 'npm', NODE_GYP_IN_NPM), join(prefix, 'node_modules', 'npm', NODE_GYP_IN_NPM)]) {
      if (existsSync(c)) return c;
    }
  }
  return null;
}

/** Node's own headers, so node-gyp never tries to download them (there may be no network). */
function findNodeDir() {
  if (process.env.npm_config_nodedir) return process.env.npm_config_nodedir;
  const prefix = resolve(dirname(process.execPath), '..');
  if (existsSync(join(prefix, 'include', 'node', 'node_api.h')) && existsSync(join(prefix, 'include', 'node', 'common.gypi'))) return prefix;
  return null; // node-gyp falls back to its header cache or a download
}

/** The C compiler make will call, when it cannot be run; null when it can (or on Windows). */
function missingCompiler() {
  if (process.platform === 'win32') return null; // node-gyp finds Visual Studio itself
  const cc = (process.env.CC || 'cc').trim().split(/\s+/)[0];
  const r = spawnSync(cc, ['--version'], { stdio: 'ignore', timeout: 30_000 });
  return r.status === 0 ? null : cc;
}

function lastErrorLine(text) {
  const lines = text.split('\n').map((l) => l.trim()).filter(Boolean);
  const interesting = lines.filter((l) => /error|not found|cannot|could not|missing/i.test(l) && !/^gyp ERR! (stack|System|command|cwd|node -v|node-gyp -v|not ok)/.test(l));
  const line = interesting[0] ?? lines[lines.length - 1] ?? '';
  return line.length > 160 ? line.slice(0, 157) + '...' : line;
}

/**
 * Builds the addon unless it is up to date. Never throws and never rejects.
 * @returns {Promise<boolean>} whether an up-to-date addon is there afterwards.
 */
export async function buildNative() {
  try {
    if (!existsSync(source) || !existsSync(gypFile)) {
      warn(`source missing: ${source}`);
      return false;
    }
    const built = mtime(output);
    if (built > mtime(source) && built > mtime(gypFile)) return true;

    const missingCc = missingCompiler();
    if (missingCc) {
      warn(`no C compiler: \`${missingCc}\` not found; install gcc or build-essential`);
      return false;
    }
    const nodeGyp = findNodeGyp();
    if (!nodeGyp) {
      warn("node-gyp not found: npm's bundled node-gyp is missing; set npm_config_node_gyp");
      return false;
    }
    const args = [nodeGyp, 'rebuild', '--release'];
    const nodeDir = findNodeDir();
    if (nodeDir) args.push(`--nodedir=${nodeDir}`);

    const r = spawnSync(process.execPath, args, {
      cwd: nativeDir,
      encoding: 'utf8',
      timeout: BUILD_TIMEOUT_MS,
      maxBuffer: 64 << 20,
      env: { ...process.env, npm_config_loglevel: process.env.npm_config_loglevel ?? 'warn' },
    });
    const log = `$ ${process.execPath} ${args.join(' ')}\n${r.stdout ?? ''}\n${r.stderr ?? ''}\n`;
    const saveLog = () => {
      try { mkdirSync(dirname(logFile), { recursive: true }); writeFileSync(logFile, log); return `; log: ${logFile}`; } catch { return ''; }
    };
    if (r.error || r.status !== 0) {
      const why = r.error
        ? (r.error.code === 'ETIMEDOUT' ? `node-gyp timed out after ${BUILD_TIMEOUT_MS / 1000}s` : `node-gyp could not run: ${r.error.message}`)
        : `node-gyp exited with ${r.status ?? r.signal}: ${lastErrorLine(`${r.stderr}\n${r.stdout}`)}`;
      warn(why + saveLog());
      return false;
    }
    if (!existsSync(output)) {
      warn(`node-gyp succeeded but ${output} is missing` + saveLog());
      return false;
    }
    // Prove it loads (catches a wrong architecture or a missing symbol now, not at first use).
    const load = spawnSync(process.execPath, ['-e', `require(${JSON.stringify(output)})`], { encoding: 'utf8', timeout: 30_000 });
    if (load.status !== 0) {
      rmSync(output, { force: true }); // so the next build retries instead of skipping
      warn(`built but does not load: ${lastErrorLine(load.stderr ?? '')}` + saveLog());
      return false;
    }
    saveLog();
    return true;
  } catch (err) {
    warn(`unexpected failure: ${err instanceof Error ? err.message : String(err)}`);
    return false;
  }
}

if (process.argv[1] && import.meta.url === pathToFileURL(resolve(process.argv[1])).href) {
  await buildNative();
  process.exitCode = 0;
}
