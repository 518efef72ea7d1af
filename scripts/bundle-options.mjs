// The esbuild settings of the CLI bundle: scripts/build.mjs builds dist/ with them, and the
// benchmark (bench/lib/engine.mjs) builds its own copy of the engine with exactly the same.
//
// CommonJS, not an ES module: bin/strata.cjs compiles it with node:vm against a V8 code cache
// (scripts/code-cache.mjs), which only scripts can use, and a script needs none of the ES
// module loader's work for each node: builtin (~15 ms of a 60 ms `strata info` together).
export function cliBundleOptions(entry, outdir) {
  return {
    entryPoints: { strata: entry },
    outdir,
    outExtension: { '.js': '.cjs' },
    bundle: true,
    platform: 'node',
    format: 'cjs',
    target: 'node20',
    sourcemap: true,
    external: ['zstd-napi'],
    // The sources find files next to themselves through import.meta.url (ES modules under
    // vitest); in the bundle that is the bundle's own URL.
    define: { 'import.meta.url': '__strataImportMetaUrl' },
    banner: { js: "const __strataImportMetaUrl = require('node:url').pathToFileURL(__filename).href;" },
    logLevel: 'warning',
  };
}

// The Electron main process and its preload: CommonJS for Electron's loader, `electron` left to
// Electron itself. Only main/electron/ imports it; everything else they bundle is plain Node.
export function electronBundleOptions() {
  return {
    entryPoints: { main: 'main/electron/main.ts', preload: 'main/electron/preload.ts', 'job-process': 'main/electron/job-process.ts' },
    outdir: 'dist/electron',
    outExtension: { '.js': '.cjs' },
    bundle: true,
    platform: 'node',
    format: 'cjs',
    target: 'node20',
    sourcemap: true,
    external: ['electron', 'zstd-napi'],
    define: { 'import.meta.url': '__strataImportMetaUrl' },
    banner: { js: "const __strataImportMetaUrl = require('node:url').pathToFileURL(__filename).href;" },
    logLevel: 'warning',
  };
}
