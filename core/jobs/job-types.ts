// The shapes of jobs as they cross process boundaries: the JSON job descriptions (JobSpec),
// the plan they produce (JobPlan) and their result. Types only, with no I/O behind them, so
// the protocol (and through it the renderer) can name them.

export type Fmt = 'qcow2' | 'raw';

// JSON-serialisable job descriptions: the app sends these across process boundaries.
export type JobSpec =
  | {
    op: 'convert'; source: string; target: string; sourceFormat?: Fmt; targetFormat: Fmt; compress?: boolean;
    options?: Record<string, string>; backing?: string; backingFormat?: Fmt;
    /** -n: write into an existing target (--target-is-zero: it reads as zero already). */
    existing?: boolean; targetIsZero?: boolean;
    /** -S: zero-detection granularity for raw targets (default 4096; 0 copies zeros too). */
    minSparse?: number;
    /** -l: read this internal snapshot (ID or name) of the source instead of its current state. */
    snapshot?: string;
    /** -t: 'unsafe' (default) never syncs the target; 'writeback' does at the end. */
    cache?: 'unsafe' | 'writeback';
    /** -U: read the source without taking its locks. */
    forceShare?: boolean;
  }
  | { op: 'compact'; image: string; compress?: boolean }
  | { op: 'commit'; image: string; base?: string; keep?: boolean }
  | { op: 'empty'; image: string }
  | { op: 'merge'; image: string; /** Folders scanned for the layer's children besides its own. */ folders?: string[] }
  | {
    op: 'rebase'; image: string; backing: string /* '' = flatten */; backingFormat?: Fmt; unsafe?: boolean;
    /** Unsafe only: a format name Strata does not open (host_device, file, vmdk...), recorded as given. */
    backingFormatName?: string;
  }
  | {
    op: 'mirror'; source: string; target: string; targetFormat?: Fmt; sync?: 'full' | 'top'; existing?: boolean;
    sourceFormat?: Fmt; options?: Record<string, string>; forceShare?: boolean;
  }
  | {
    op: 'snapshot'; image: string; action: 'create' | 'apply' | 'delete'; name: string;
    /** Fail as qemu-img does (a create that overflows a refcount leaves its L1 copy behind). */
    qemu?: boolean;
  }
  | { op: 'resize'; image: string; size: number; shrink?: boolean; /** size is a delta (+N/-N) */ relative?: boolean; format?: Fmt; preallocation?: 'off' | 'metadata' | 'falloc' | 'full' }
  | { op: 'check'; image: string; repair: 'leaks' | 'all'; format?: Fmt }
  | {
    op: 'create'; image: string; format: Fmt; size?: number; backing?: string; backingFormat?: Fmt; options?: Record<string, string>;
    /** -u: do not open the backing file (SIZE is then required). */
    unsafe?: boolean;
  };

export type JobOp = JobSpec['op'];
export type SpecOf<O extends JobOp> = Extract<JobSpec, { op: O }>;

export interface PlanHolder { pid: number; program: string; vm: string | null }
/** One image of a chain. */
export interface PlanChainLink { filename: string; format: Fmt; virtualSize: number }

export interface PlanSpace {
  mountPoint: string;
  needed: number;
  available: number | null;
  /** What the space is for, as the refusal says it ("the converted image"). */
  purpose: string;
  /** The same, file by file (what each file grows by, at its largest during the job). */
  files: { filename: string; needed: number }[];
}

export interface JobPlan {
  operation: JobOp;
  /** e.g. "Commit top.qcow2 into base.qcow2" */
  title: string;
  /** Absolute paths modified in place. */
  writes: string[];
  creates: string[];
  renames: { from: string; to: string }[];
  removes: string[];
  /** Each chain touched, as it will be afterwards, top first. */
  chainsAfter: PlanChainLink[][];
  bytesToRead: number;
  /** Bytes the job will write as data (exact for commit, rebase, empty and a fresh mirror, from block status). */
  bytesToCopy: number;
  /** Per target file system. */
  space: PlanSpace[];
  spaceNeeded: number;
  /** The tightest file system's free space (null when unknown). */
  spaceAvailable: number | null;
  /** Other images whose guest content changes (e.g. other overlays of a shared base). */
  affected: { filename: string; reason: string }[];
  /** Images in use: the run refuses. */
  blocked: { filename: string; reason: string; holder: PlanHolder | null }[];
  warnings: string[];
  /** Why the run requires force (e.g. a shared base), else null. */
  needsForce: string | null;
  /** compact: actual size now and after. */
  expectedSize?: { before: number; after: number };
  /** argv of the equivalent strata command. */
  command: string[];
  /**
   * Why the run would refuse whatever the options (no space, no permission): one line each.
   * The run reports the first.
   */
  problems: string[];
}

export interface JobResult {
  operation: JobOp;
  summary: string;
  /** Bytes written as guest data (zero writes that only set flags are not counted). */
  bytesWritten: number;
  /** Files created or changed. */
  outputs: string[];
}

