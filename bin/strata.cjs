#!/bin/sh
":" //; unset NODE_EXTRA_CA_CERTS; exec node --interrupt-budget=540000 "$0" "$@"
// The line above is for sh (the `strata` command npm links here), a string and a comment for
// JavaScript. It starts node the way a short-lived command that moves a lot of data wants it:
// - without NODE_EXTRA_CA_CERTS: Strata makes no TLS connections, but Node 20 reads and parses
//   the whole file it names when every process starts; with a distribution's CA bundle that is
//   ~30 ms of a command's ~50 ms start (it is set by default on many CI and corporate machines);
// - with V8's tier-up budget 8x its default: only the really hot code (per-cluster loops) gets
//   optimised by TurboFan, not every function a job calls a few thousand times. On a 2-core
//   machine those background compilations took CPU from the threads copying data: convert's
//   user CPU dropped by a fifth (0.315 -> 0.25 s for 2 GiB), check's did not grow.
// `node bin/strata.cjs` runs the same program with node's defaults.
//
// The program is dist/strata.cjs, compiled here as a script with its V8 code cache
// (dist/strata.cjs.cache, made by `npm run build`, see scripts/code-cache.mjs) so that the
// functions it holds are not parsed and compiled again at every start. This file is CommonJS
// for the same reason: an ES module entry would start node's module loader first. V8 ignores a
// cache made by another V8 version or with other flags (`node bin/strata.cjs` has no
// --interrupt-budget), and without one it compiles as usual. STRATA_CODE_CACHE=write writes
// the cache at exit (the build does that); STRATA_CODE_CACHE=report says on stderr whether
// V8 took it.
'use strict';
const { existsSync, readFileSync, writeFileSync } = require('node:fs');
const { createRequire } = require('node:module');
const { dirname, join } = require('node:path');
const { Script } = require('node:vm');

const bundle = join(__dirname, '..', 'dist', 'strata.cjs');
if (!existsSync(bundle)) {
  process.stderr.write('strata: not built yet: run `npm install` (or `npm run build`) in ' + join(__dirname, '..') + '\n');
  process.exit(1);
}
const cacheFile = bundle + '.cache';
let cachedData;
try { cachedData = readFileSync(cacheFile); } catch { /* no cache: compile as usual */ }
// The wrapper Node gives a CommonJS module, so the bundle sees the usual module variables.
const source = '(function (exports, require, module, __filename, __dirname) { ' + readFileSync(bundle, 'utf8') + '\n});';
const script = new Script(source, { filename: bundle, cachedData });
if (process.env.STRATA_CODE_CACHE === 'report') {
  process.stderr.write(`strata: code cache ${!cachedData ? 'missing' : script.cachedDataRejected ? 'rejected' : 'used'}\n`);
}
if (process.env.STRATA_CODE_CACHE === 'write') {
  process.on('exit', () => {
    try { writeFileSync(cacheFile, script.createCachedData()); } catch { /* a cache is only an optimisation */ }
  });
}
const bundleModule = { exports: {} };
script.runInThisContext()(bundleModule.exports, createRequire(bundle), bundleModule, bundle, dirname(bundle));
