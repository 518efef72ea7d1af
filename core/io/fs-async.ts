// The file calls the engine awaits, as promises over node:fs's callback API.
//
// Not node:fs/promises: loading it also loads node's readline, fs watcher and directory
// modules, ~4 ms of every command's start (node -e "require('fs/promises')" 58 vs 55 ms on a
// 2-vCPU VM), and its FileHandle costs more per call. node:fs is loaded with node already.
import * as fs from 'node:fs';
import { promisify } from 'node:util';

export const open = promisify(fs.open);
export const close = promisify(fs.close);
export const fstat = promisify(fs.fstat);
export const ftruncate = promisify(fs.ftruncate);
export const fdatasync = promisify(fs.fdatasync);
export const stat = promisify(fs.stat);
export const realpath = promisify(fs.realpath);
export const unlink = promisify(fs.unlink);
export const readdir = promisify(fs.readdir);
export const readFile = promisify(fs.readFile);
export const readlink = promisify(fs.readlink);
/** Resolves to { bytesRead, buffer } (fs.read's own promisified form). */
export const read = promisify(fs.read);
