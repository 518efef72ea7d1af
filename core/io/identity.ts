// Which file a name is, whatever the name: the device and inode number, the same through
// symlinks, hard links and different spellings of a path. Jobs use it to refuse writing into
// an image they read (convert -U A A would otherwise empty A before reading it).
import { stat } from './fs-async';

export interface FileIdentity {
  dev: number;
  ino: number;
}

/** The identity of the file `path` names (symlinks followed), or null when there is none. */
export async function identityOf(path: string): Promise<FileIdentity | null> {
  try {
    const st = await stat(path);
    return { dev: st.dev, ino: st.ino };
  } catch {
    return null;
  }
}

export function sameFile(a: FileIdentity | null, b: FileIdentity | null): boolean {
  return a !== null && b !== null && a.dev === b.dev && a.ino === b.ino;
}
