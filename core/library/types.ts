// What the library knows about the images in a set of folders: one record per image file
// (from its header and its inode), and the graph built from them (who backs whom).

/** Stable problem codes (the CLI's JSON and the app show them). */
export const PROBLEM_CODES = [
  'backing-missing', 'backing-loop', 'backing-unreadable', 'backing-format-unspecified', 'backing-changed',
  'damaged', 'dirty', 'corrupt', 'in-use', 'unreadable',
] as const;
export type ProblemCode = (typeof PROBLEM_CODES)[number];

export interface Problem {
  code: ProblemCode;
  /** One sentence for a person: what is wrong and why it matters. */
  message: string;
}

/** The process holding an image through QEMU's locks. */
export interface Holder {
  pid: number;
  program: string;
  vm: string | null;
}

/** What one image file says about itself (header and inode), before the graph is built. */
export interface ImageRecord {
  /** Absolute path as found (a symlink's own name, not its target). */
  path: string;
  /** The file it is, symlinks resolved: the graph's key. */
  realPath: string;
  dev: number;
  ino: number;
  /** null when the file could not be read as an image (see `error`). */
  format: 'qcow2' | 'raw' | null;
  /** Why the header could not be used: damaged (format error) or unreadable (permissions, odd file). */
  error: { code: 'damaged' | 'unreadable'; message: string } | null;
  virtualSize: number;
  /** Bytes the file occupies on disk (st_blocks * 512). */
  actualSize: number;
  fileSize: number;
  clusterSize: number | null;
  /** qcow2 '0.10' (version 2) or '1.1' (version 3). */
  compat: '0.10' | '1.1' | null;
  extendedL2: boolean;
  compressionType: 'zlib' | 'zstd' | null;
  refcountBits: number | null;
  lazyRefcounts: boolean;
  snapshots: number;
  bitmaps: number;
  dirty: boolean;
  corrupt: boolean;
  /** The backing name exactly as recorded in the header. */
  backingName: string | null;
  /** Its recorded format, or null (then QEMU probes it). */
  backingFormat: string | null;
  /**
   * Overlays: false when the active L1 table points to no L2 table at all, so nothing a
   * change of the backing file could hide or reveal is stored here (an emptied overlay);
   * null when not known.
   */
  hasData: boolean | null;
  mtimeMs: number;
  /** Birth time where the file system records it, else null. */
  birthtimeMs: number | null;
  /** Outside the scanned folders: read only because an image there names it as its backing file. */
  external: boolean;
}

/** A fix for a problem: the exact command, and the job it runs (for the app's plan preview). */
export interface Fix {
  problem: ProblemCode;
  description: string;
  /** argv of the strata command, 'strata' first. */
  command: string[];
  /** The job the app plans and runs for it (the same command as a job description). */
  job: { op: 'rebase'; image: string; backing: string; backingFormat: 'qcow2' | 'raw'; unsafe: true } | { op: 'check'; image: string; repair: 'all' };
}

/** A file that could stand in for a missing backing file, best first. */
export interface BackingCandidate {
  path: string;
  format: 'qcow2' | 'raw';
  virtualSize: number;
  /** Why it is proposed: same name, same size and format, or both. */
  reason: string;
}

/** An image in the graph. */
export interface LibraryImage extends ImageRecord {
  /** Where the backing name resolves (absolute), or null without a backing file. */
  backingPath: string | null;
  /** The recorded backing name is relative (resolved against the overlay's folder). */
  backingRelative: boolean;
  /** realPath of the backing image when it is in the graph. */
  backing: string | null;
  /** realPaths of the images that use this one as their backing file, sorted by path. */
  children: string[];
  inUse: Holder | null;
  problems: Problem[];
  fixes: Fix[];
  /** For backing-missing: files that could be the moved backing file. */
  candidates: BackingCandidate[];
}

export interface LibrarySummary {
  images: number;
  /** Images without a backing file that others use. */
  bases: number;
  /** Bases used by more than one overlay. */
  sharedBases: number;
  overlays: number;
  /** No backing file and no overlays. */
  standalone: number;
  /** Images with at least one problem. */
  withProblems: number;
  inUse: number;
  totalActualSize: number;
}

export interface LibrarySnapshot {
  /** The folders and files that were scanned, as given (absolute). */
  scanned: string[];
  /** Every image, sorted by path; `external` ones were reached only as backing files. */
  images: LibraryImage[];
  /** realPaths of the images at the top of the tree: no backing file, or a broken one. */
  treeRoots: string[];
  summary: LibrarySummary;
  /** Entries that could not be listed or read while walking (folder, message). */
  warnings: string[];
}
