// `npm start`: the desktop app where Electron's binary is installed (and a display exists);
// otherwise one line saying why, and the same app in the browser (`strata serve`), on the
// folders you chose before or, the first time, on a sample library.
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { fetchElectron } from './electron-binary.mjs';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const args = process.argv.slice(2);

if (!existsSync(join(root, 'dist', 'renderer', 'index.html')) || !existsSync(join(root, 'dist', 'electron', 'main.cjs'))) {
  const r = spawnSync(process.execPath, [join(root, 'scripts', 'build.mjs')], { cwd: root, stdio: 'inherit' });
  if (r.status !== 0) process.exit(r.status ?? 1);
}

function settingsHaveFolders() {
  const base = process.env.STRATA_DATA_DIR || join(process.env.XDG_CONFIG_HOME || join(process.env.HOME || '/root', '.config'), 'strata');
  try { return JSON.parse(readFileSync(join(base, 'settings.json'), 'utf8')).folders?.length > 0; } catch { return false; }
}

const e = fetchElectron();
const desktop = !!(process.env.DISPLAY || process.env.WAYLAND_DISPLAY);
if (e.bin && desktop) {
  const child = spawn(e.bin, [join(root, 'dist', 'electron', 'main.cjs'), ...args], { stdio: 'inherit' });
  child.on('exit', (code) => process.exit(code ?? 0));
} else {
  const why = e.bin ? 'there is no display (DISPLAY and WAYLAND_DISPLAY are unset)' : e.why;
  const extra = args.length ? args : settingsHaveFolders() ? [] : ['--demo'];
  process.stdout.write(`Strata: no desktop window, since ${why}; starting browser mode instead${extra.includes('--demo') ? ' with a sample library' : ''}.\n`);
  const child = spawn(process.execPath, [join(root, 'bin', 'strata.cjs'), 'serve', ...extra], { stdio: 'inherit' });
  const forward = (sig) => child.kill(sig);
  process.on('SIGINT', () => forward('SIGINT'));
  process.on('SIGTERM', () => forward('SIGTERM'));
  child.on('exit', (code) => process.exit(code ?? 0));
}
