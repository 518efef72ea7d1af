// Builds what bin/strata.cjs needs: the CLI bundled into dist/ so it starts fast under plain
// Node, and the V8 code cache of that bundle (scripts/code-cache.mjs).
import { buildNative } from './build-native.mjs'; await buildNative(); // optional addon; never fails the build
import { build } from 'esbuild';
import { rmSync } from 'node:fs';
import { cliBundleOptions } from './bundle-options.mjs';
import { warmCodeCache } from './code-cache.mjs';

await build(cliBundleOptions('cli/main.ts', 'dist'));
rmSync('dist/strata.mjs', { force: true }); // the ES module bundle of earlier versions
rmSync('dist/strata.mjs.map', { force: true });
rmSync('dist/strata.cjs.cache', { force: true }); // made again for this bundle
warmCodeCache('bin/strata.cjs');
