// Builds everything `npm start`, `strata` and the tests need:
//   - the native addon (optional: never fails the build),
//   - the CLI bundle dist/strata.cjs with its V8 code cache (it is also the job process),
//   - the renderer (Vite: React + Tailwind) into dist/renderer, after describing the protocol's
//     schemas for its checks (scripts/gen-checks.mjs),
//   - the Electron main process and preload into dist/electron.
// `node scripts/build.mjs cli` builds only the first two (what the engine's tests need).
import { buildNative } from './build-native.mjs'; await buildNative(); // optional addon; never fails the build
import { build } from 'esbuild';
import { rmSync } from 'node:fs';
import { cliBundleOptions, electronBundleOptions } from './bundle-options.mjs';
import { warmCodeCache } from './code-cache.mjs';

const only = process.argv[2];

await build(cliBundleOptions('cli/main.ts', 'dist'));
rmSync('dist/strata.mjs', { force: true }); // the ES module bundle of earlier versions
rmSync('dist/strata.mjs.map', { force: true });
rmSync('dist/strata.cjs.cache', { force: true }); // made again for this bundle
warmCodeCache('bin/strata.cjs');

if (only !== 'cli') {
  await import('./gen-checks.mjs'); // the page's checks, from the protocol's schemas
  const vite = await import('vite');
  await vite.build({ configFile: 'renderer/vite.config.ts', logLevel: 'warn' });
  await build(electronBundleOptions());
}

// `npm install` runs this as its prepare step: fetch Electron's binary there too, where the
// machine can (npm runs no dependency's install script unless package.json's allowScripts lists
// it, and electron's fails the whole install where its download host is unreachable). A failed
// fetch is one line, never an error: `npm start` then opens the app in the browser instead.
if (only !== 'cli' && process.env.npm_lifecycle_event === 'prepare' && process.env.ELECTRON_SKIP_BINARY_DOWNLOAD !== '1') {
  const { fetchElectron } = await import('./electron-binary.mjs');
  const r = fetchElectron();
  process.stdout.write(r.bin ? `Electron: ${r.bin}\n` : `Electron: no desktop binary (${r.why}); npm start will open the app in your browser.\n`);
}
