// Builds what bin/strata.mjs needs: the CLI bundled into dist/ so it starts fast under plain Node.
import { buildNative } from './build-native.mjs'; await buildNative(); // optional addon; never fails the build
import { build } from 'esbuild';
import { cliBundleOptions } from './bundle-options.mjs';

await build(cliBundleOptions('cli/main.ts', 'dist'));
