// A seam for the failure tests: every file the engine opens for writing is passed through the
// interposer when one is set, and the engine writes through what it returns (a file that
// fails chosen writes, or one that records them for crash simulation). Unset, as it always is
// outside the tests, files are used as opened.
import type { BlockFile } from './block-file';

export type WriteInterposer = (file: BlockFile) => Promise<BlockFile> | BlockFile;

let current: WriteInterposer | null = null;

/** Sets (or with null clears) the interposer; returns the one it replaces. */
export function setWriteInterposer(fn: WriteInterposer | null): WriteInterposer | null {
  const prev = current;
  current = fn;
  return prev;
}

/** `file`, or what the interposer makes of it when `file` is writable and one is set. */
export async function interposeWritable(file: BlockFile): Promise<BlockFile> {
  return current && file.writable ? current(file) : file;
}
