#!/bin/sh
":" //; unset NODE_EXTRA_CA_CERTS; exec node "$0" "$@"
// The line above is for sh (the `strata` command npm links here), a string and a comment for
// JavaScript. Strata makes no TLS connections, but Node 20 reads and parses the whole file named
// by NODE_EXTRA_CA_CERTS when every process starts: with a distribution's CA bundle that is
// ~30 ms of a command's ~50 ms start (it is set by default on many CI and corporate machines),
// so the command drops it. `node bin/strata.mjs` runs the same program with it.
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const entry = new URL('../dist/strata.mjs', import.meta.url);
if (!existsSync(fileURLToPath(entry))) {
  process.stderr.write('strata: not built yet: run `npm install` (or `npm run build`) in ' + fileURLToPath(new URL('..', import.meta.url)) + '\n');
  process.exit(1);
}
await import(entry.href);
