// Where Electron's binary is, fetching it once (quietly, bounded) when it is not there yet.
// Shared by the build (npm install's prepare step) and `npm start`.
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');

/** { bin } when Electron's binary exists (after one download attempt), else { why }. */
export function fetchElectron() {
  const require = createRequire(join(root, 'package.json'));
  let pkgDir;
  try { pkgDir = dirname(require.resolve('electron/package.json')); } catch { return { why: 'the electron package is not installed' }; }
  const pathFile = join(pkgDir, 'path.txt');
  if (!existsSync(pathFile)) {
    // Electron's own installer; it fails within a second where its download host is unreachable.
    if (process.env.ELECTRON_SKIP_BINARY_DOWNLOAD !== '1') spawnSync(process.execPath, [join(pkgDir, 'install.js')], { stdio: 'ignore', timeout: 120_000 });
    if (!existsSync(pathFile)) return { why: "Electron's binary could not be downloaded on this machine" };
  }
  const bin = join(pkgDir, 'dist', readFileSync(pathFile, 'utf8').trim());
  return existsSync(bin) ? { bin } : { why: `Electron's binary is missing (${bin})` };
}
