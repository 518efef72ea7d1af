// One typed protocol between the renderer and the main process (over Electron IPC or, in
// browser mode, a WebSocket): requests with replies, and events. Every message is checked
// against these schemas where it arrives; the method table is the only list of what a
// renderer may ask.
import { z } from 'zod';
import { ErrorInfoSchema, JobPlanSchema, JobRecordSchema, JobSpecSchema, ProgressSchema } from './jobs';
import { ImageInfoSchema, LibrarySnapshotSchema, MapSummarySchema, SettingsSchema, ThemeSchema } from './library';

/** Requests larger than this are refused unread (a renderer never needs more). */
export const MAX_REQUEST_BYTES = 1 << 20;

const path = z.string().min(1).max(4096).refine((p) => !p.includes('\0'), 'paths cannot contain NUL bytes');

export const AppInfoSchema = z.object({
  version: z.string(),
  /** 'electron': a desktop window; 'browser': served by `strata serve`. */
  mode: z.enum(['electron', 'browser']),
  platform: z.string(),
  /** The native addon: QEMU's image locks, hole detection. */
  native: z.object({ available: z.boolean(), reason: z.string().nullable() }),
  dataDir: z.string(),
  home: z.string(),
  /** Usual image folders that exist on this machine (proposed on first run). */
  suggestedFolders: z.array(z.string()),
});

export const DirEntrySchema = z.object({
  name: z.string(),
  path: z.string(),
  kind: z.enum(['dir', 'file', 'other']),
  size: z.number(),
  /** A file that starts with the qcow2 magic or has a raw image's extension. */
  image: z.boolean(),
});

export const ImageDetailsSchema = z.object({
  info: ImageInfoSchema,
  /** The backing chain below the image, each as `info` reports it, top first (without the image). */
  chain: z.array(ImageInfoSchema),
  /** Why the chain stops early (a missing or unreadable backing file), if it does. */
  chainError: z.string().nullable(),
});

/** method name -> params and result schemas. */
export const METHODS = {
  'app.info': { params: z.strictObject({}), result: AppInfoSchema },
  'library.get': { params: z.strictObject({}), result: LibrarySnapshotSchema },
  'library.rescan': { params: z.strictObject({}), result: LibrarySnapshotSchema },
  'library.addFolder': { params: z.strictObject({ path }), result: SettingsSchema },
  'library.removeFolder': { params: z.strictObject({ path }), result: SettingsSchema },
  'library.createDemo': { params: z.strictObject({}), result: SettingsSchema },
  'image.details': { params: z.strictObject({ path }), result: ImageDetailsSchema },
  'image.mapSummary': { params: z.strictObject({ path, buckets: z.number().int().min(1).max(4096) }), result: MapSummarySchema },
  'fs.list': { params: z.strictObject({ path }), result: z.object({ path: z.string(), parent: z.string().nullable(), entries: z.array(DirEntrySchema) }) },
  'jobs.plan': { params: z.strictObject({ spec: JobSpecSchema }), result: JobPlanSchema },
  'jobs.start': { params: z.strictObject({ spec: JobSpecSchema, force: z.boolean().optional() }), result: JobRecordSchema },
  'jobs.cancel': { params: z.strictObject({ id: z.string().max(64) }), result: JobRecordSchema },
  'jobs.list': { params: z.strictObject({}), result: z.array(JobRecordSchema) },
  'jobs.clearHistory': { params: z.strictObject({}), result: z.array(JobRecordSchema) },
  'settings.get': { params: z.strictObject({}), result: SettingsSchema },
  'settings.update': { params: z.strictObject({ theme: ThemeSchema.optional(), concurrency: z.number().int().min(1).max(16).optional(), onboarded: z.boolean().optional() }), result: SettingsSchema },
} as const;

export type Method = keyof typeof METHODS;
export type Params<M extends Method> = z.infer<(typeof METHODS)[M]['params']>;
export type Result<M extends Method> = z.infer<(typeof METHODS)[M]['result']>;

/** Events the main process sends without being asked. */
export const EVENTS = {
  /** The library changed (scan, rescan, holders). */
  library: LibrarySnapshotSchema,
  /** A job was queued, started, ended or changed state. */
  job: JobRecordSchema,
  /** Progress of a running job (4-10 a second at most). */
  progress: z.object({ id: z.string(), progress: ProgressSchema }),
  /** Settings changed (another window, or a folder added). */
  settings: SettingsSchema,
} as const;

export type EventName = keyof typeof EVENTS;
export type EventData<E extends EventName> = z.infer<(typeof EVENTS)[E]>;

export const RequestSchema = z.strictObject({
  type: z.literal('request'),
  id: z.number().int().nonnegative(),
  method: z.string().max(64),
  params: z.unknown(),
});
export type Request = z.infer<typeof RequestSchema>;

export const ResponseSchema = z.discriminatedUnion('ok', [
  z.strictObject({ type: z.literal('response'), id: z.number().int().nonnegative(), ok: z.literal(true), result: z.unknown() }),
  z.strictObject({ type: z.literal('response'), id: z.number().int().nonnegative().nullable(), ok: z.literal(false), error: ErrorInfoSchema }),
]);
export type Response = z.infer<typeof ResponseSchema>;

export const EventSchema = z.strictObject({ type: z.literal('event'), event: z.string(), data: z.unknown() });
export type EventMessage = z.infer<typeof EventSchema>;

export const ServerMessageSchema = z.union([ResponseSchema, EventSchema]);

export function isMethod(name: string): name is Method {
  return Object.prototype.hasOwnProperty.call(METHODS, name);
}

export function isEvent(name: string): name is EventName {
  return Object.prototype.hasOwnProperty.call(EVENTS, name);
}

/** A zod error as one line: where in the message, and what was wrong. */
export function describeIssues(err: z.ZodError): string {
  return err.issues.slice(0, 3).map((i) => `${i.path.length ? i.path.join('.') : 'message'}: ${i.message}`).join('; ');
}
