// The library, images and settings as they cross process boundaries.
import { z } from 'zod';
import { PROBLEM_CODES, type LibrarySnapshot } from '../library/types';

const problemCode = z.enum(PROBLEM_CODES);
const holder = z.object({ pid: z.number(), program: z.string(), vm: z.string().nullable() });

export const LibraryImageSchema = z.object({
  path: z.string(),
  realPath: z.string(),
  dev: z.number(),
  ino: z.number(),
  format: z.enum(['qcow2', 'raw']).nullable(),
  error: z.object({ code: z.enum(['damaged', 'unreadable']), message: z.string() }).nullable(),
  virtualSize: z.number(),
  actualSize: z.number(),
  fileSize: z.number(),
  clusterSize: z.number().nullable(),
  compat: z.enum(['0.10', '1.1']).nullable(),
  extendedL2: z.boolean(),
  compressionType: z.enum(['zlib', 'zstd']).nullable(),
  refcountBits: z.number().nullable(),
  lazyRefcounts: z.boolean(),
  snapshots: z.number(),
  bitmaps: z.number(),
  dirty: z.boolean(),
  corrupt: z.boolean(),
  backingName: z.string().nullable(),
  backingFormat: z.string().nullable(),
  hasData: z.boolean().nullable(),
  mtimeMs: z.number(),
  birthtimeMs: z.number().nullable(),
  external: z.boolean(),
  backingPath: z.string().nullable(),
  backingRelative: z.boolean(),
  backing: z.string().nullable(),
  children: z.array(z.string()),
  inUse: holder.nullable(),
  problems: z.array(z.object({ code: problemCode, message: z.string() })),
  fixes: z.array(z.object({
    problem: problemCode,
    description: z.string(),
    command: z.array(z.string()),
    job: z.union([
      z.object({ op: z.literal('rebase'), image: z.string(), backing: z.string(), backingFormat: z.enum(['qcow2', 'raw']), unsafe: z.literal(true) }),
      z.object({ op: z.literal('check'), image: z.string(), repair: z.literal('all') }),
    ]),
  })),
  candidates: z.array(z.object({ path: z.string(), format: z.enum(['qcow2', 'raw']), virtualSize: z.number(), reason: z.string() })),
});

export const LibrarySnapshotSchema = z.object({
  scanned: z.array(z.string()),
  images: z.array(LibraryImageSchema),
  treeRoots: z.array(z.string()),
  summary: z.object({
    images: z.number(), bases: z.number(), sharedBases: z.number(), overlays: z.number(), standalone: z.number(),
    withProblems: z.number(), inUse: z.number(), totalActualSize: z.number(),
  }),
  warnings: z.array(z.string()),
});

// The schema and the core's type describe the same thing: a change to one without the other
// fails to compile here.
type Same<A, B> = [A] extends [B] ? ([B] extends [A] ? true : false) : false;
const librarySnapshotMatches: Same<z.infer<typeof LibrarySnapshotSchema>, LibrarySnapshot> = true;
void librarySnapshotMatches;

export const SnapshotInfoSchema = z.object({
  id: z.string(),
  name: z.string(),
  'vm-state-size': z.number(),
  'date-sec': z.number(),
  'date-nsec': z.number(),
  'vm-clock-sec': z.number(),
  'vm-clock-nsec': z.number(),
  icount: z.number().optional(),
});

/** `strata info` of one image (qemu-img's JSON), as the details view shows it. */
export const ImageInfoSchema = z.object({
  'virtual-size': z.number(),
  filename: z.string(),
  'cluster-size': z.number().optional(),
  format: z.string(),
  'actual-size': z.number(),
  'format-specific': z.object({ type: z.literal('qcow2'), data: z.record(z.string(), z.unknown()) }).optional(),
  'full-backing-filename': z.string().optional(),
  'backing-filename': z.string().optional(),
  'backing-filename-format': z.string().optional(),
  'dirty-flag': z.boolean(),
  snapshots: z.array(SnapshotInfoSchema).optional(),
});
export type ImageInfoMessage = z.infer<typeof ImageInfoSchema>;

export const MapSummarySchema = z.object({
  virtualSize: z.number(),
  bucketSize: z.number(),
  buckets: z.number(),
  layers: z.array(z.object({
    filename: z.string(), format: z.string(), depth: z.number(), virtualSize: z.number(),
    data: z.array(z.number()), zero: z.array(z.number()), unallocated: z.array(z.number()), compressed: z.array(z.number()),
  })),
});
export type MapSummaryMessage = z.infer<typeof MapSummarySchema>;

export const ThemeSchema = z.enum(['system', 'light', 'dark']);

export const SettingsSchema = z.object({
  folders: z.array(z.string().min(1).max(4096)).max(256),
  concurrency: z.number().int().min(1).max(16),
  theme: ThemeSchema,
  /** The first-run proposal was answered (folders chosen or dismissed). */
  onboarded: z.boolean(),
});
export type Settings = z.infer<typeof SettingsSchema>;
