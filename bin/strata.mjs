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
// `node bin/strata.mjs` runs the same program with node's defaults.
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const entry = new URL('../dist/strata.mjs', import.meta.url);
if (!existsSync(fileURLToPath(entry))) {
  process.stderr.write('strata: not built yet: run `npm install` (or `npm run build`) in ' + fileURLToPath(new URL('..', import.meta.url)) + '\n');
  process.exit(1);
}
await import(entry.href);
