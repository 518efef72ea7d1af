// The Node built-in modules only compression, encryption and NBD need, loaded on first use
// (through require: the launcher's code-cached script has no dynamic import()).
//
// node:zlib, node:worker_threads, node:crypto and node:net load node's streams with them. A `strata` command starts
// them all at once if they are imported at the top: about 6 ms of a 2 GiB `convert`'s 350,
// spent before it reads a byte, by a command that never compresses anything.
import { createRequire } from 'node:module';
import type * as Zlib from 'node:zlib';
import type * as WorkerThreads from 'node:worker_threads';
import type * as Crypto from 'node:crypto';
import type * as Net from 'node:net';

const load = createRequire(import.meta.url);

let zlibModule: typeof Zlib | undefined;
let workerThreadsModule: typeof WorkerThreads | undefined;
let cryptoModule: typeof Crypto | undefined;
let netModule: typeof Net | undefined;

export function zlib(): typeof Zlib {
  return (zlibModule ??= load('node:zlib') as typeof Zlib);
}

export function workerThreads(): typeof WorkerThreads {
  return (workerThreadsModule ??= load('node:worker_threads') as typeof WorkerThreads);
}

/** For encrypted images (AES, LUKS) only. */
export function crypto(): typeof Crypto {
  return (cryptoModule ??= load('node:crypto') as typeof Crypto);
}

/** For NBD exports only. */
export function net(): typeof Net {
  return (netModule ??= load('node:net') as typeof Net);
}
