// The Node built-in modules only compression needs, loaded on first use.
//
// node:zlib and node:worker_threads load node's streams with them. A `strata` command starts
// them all at once if they are imported at the top: about 6 ms of a 2 GiB `convert`'s 350,
// spent before it reads a byte, by a command that never compresses anything.
import { createRequire } from 'node:module';
import type * as Zlib from 'node:zlib';
import type * as WorkerThreads from 'node:worker_threads';

const load = createRequire(import.meta.url);

let zlibModule: typeof Zlib | undefined;
let workerThreadsModule: typeof WorkerThreads | undefined;

export function zlib(): typeof Zlib {
  return (zlibModule ??= load('node:zlib') as typeof Zlib);
}

export function workerThreads(): typeof WorkerThreads {
  return (workerThreadsModule ??= load('node:worker_threads') as typeof WorkerThreads);
}
