// Overlays of an image: qcow2 files in some folders whose backing file is that image. Commit,
// merge and the plans use it to name the images a change of a base would reach. Only headers
// are read, and only of regular files (a FIFO or a device in the folder would block an open or
// a read for ever). Self-contained until the library's dependency graph takes this over.
import { readdir, realpath, stat } from '../io/fs-async';
import { join, dirname, resolve } from 'node:path';
import { decodeHeader, isQcow2Magic } from '../format/header';
import { combineBackingPath } from '../chain/open';
import { localPathOrNull } from '../chain/names';
import { NodeFile } from '../io/node-file';

export interface Overlay {
  /** As found in the folder (folder + name). */
  path: string;
  /** The backing name it records, and the format it records for it. */
  backingFile: string;
  backingFormat: string | null;
}

export async function realOrSelf(p: string): Promise<string> {
  try { return await realpath(p); } catch { return resolve(p); }
}

/**
 * qcow2 images in `folders` (default: the image's own folder) whose backing file resolves to
 * `image`, other than those in `except`. Sorted by path; each folder scanned once.
 */
export async function findOverlays(image: string, opts: { folders?: string[]; except?: string[] } = {}): Promise<Overlay[]> {
  const target = await realOrSelf(image);
  const skip = new Set(await Promise.all((opts.except ?? []).map(realOrSelf)));
  const folders = opts.folders?.length ? opts.folders : [dirname(image)];
  const seenDirs = new Set<string>();
  const seenFiles = new Set<string>();
  const out: Overlay[] = [];
  for (const folder of folders) {
    const realDir = await realOrSelf(folder);
    if (seenDirs.has(realDir)) continue;
    seenDirs.add(realDir);
    let names: string[] = [];
    try { names = await readdir(folder); } catch { continue; }
    for (const name of names.sort()) {
      // A compaction's temporary copy (live, or left by a killed run) is no overlay of anyone.
      if (name.startsWith('.') && name.includes('.strata-compact-')) continue;
      const path = join(folder, name);
      const o = await readOverlayHeader(path);
      if (!o) continue;
      const me = await realOrSelf(path);
      if (skip.has(me) || seenFiles.has(me) || me === target) continue;
      // file: and json: names are paths too (relative to the working directory, as in QEMU).
      const named = localPathOrNull(combineBackingPath(path, o.backingFile));
      if (named === null || (await realOrSelf(named)) !== target) continue;
      seenFiles.add(me);
      out.push({ path, ...o });
    }
  }
  return out.sort((a, b) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0));
}

/** The backing name and format a qcow2 file records, or null (not a regular qcow2 file, no backing). */
async function readOverlayHeader(path: string): Promise<{ backingFile: string; backingFormat: string | null } | null> {
  try {
    if (!(await stat(path)).isFile()) return null;
  } catch {
    return null;
  }
  let f: NodeFile | null = null;
  try {
    f = await NodeFile.open(path);
    const head = Buffer.alloc(65536);
    const got = await f.read(head, 0);
    if (got < 72 || !isQcow2Magic(head)) return null;
    const clusterBits = head.readUInt32BE(20);
    const p = decodeHeader(head.subarray(0, Math.min(got, 2 ** Math.min(clusterBits, 16))), path);
    if (!p.backingFile) return null;
    return { backingFile: p.backingFile, backingFormat: p.backingFormat };
  } catch {
    return null; // not an image we can read: not an overlay we can name
  } finally {
    await f?.close();
  }
}
