// qcow2 compression_type 1: zstd.
//
// QEMU (qcow2-threads.c) writes one frame per cluster with ZSTD_compressStream2(ZSTD_e_end)
// at the default level, so the frame carries its content size. It reads with
// ZSTD_decompressStream over the whole sector-rounded byte run, frame after frame, until
// the cluster is full, and ignores what follows. Every zstd library call we can use here
// rejects trailing bytes after a frame, so we walk the frame headers and block headers
// ourselves (RFC 8878) to find where each frame ends, and hand the decoder exactly one
// frame at a time, straight into its place in the output cluster.
//
// Backends, in order: node:zlib's zstd (Node >= 22.15, so newer Electron), zstd-napi.
import { createRequire } from 'node:module';
import { availableParallelism } from 'node:os';
import type { Worker } from 'node:worker_threads';
import { workerThreads, zlib } from './builtins';
import { CorruptImageError, UnsupportedFeatureError } from '../errors';

// ---------------------------------------------------------------------------------------
// Frame walking (RFC 8878 section 3.1)

export const ZSTD_MAGIC = 0xfd2fb528;
const SKIPPABLE_MAGIC_MASK = 0xfffffff0;
const SKIPPABLE_MAGIC = 0x184d2a50;
/** ZSTD_BLOCKSIZE_MAX */
const BLOCK_SIZE_MAX = 128 * 1024;
/**
 * ZSTD_WINDOWLOG_LIMIT_DEFAULT: the largest window zstd's streaming decoder (QEMU's) accepts
 * unless told otherwise. A frame asking for more is refused by QEMU, and by us.
 */
export const ZSTD_WINDOW_MAX = 2 ** 27;

export interface ZstdFrame {
  /** Offset of the frame's magic number in the input. */
  readonly start: number;
  /** Offset just past the frame (after its checksum, if any). */
  readonly end: number;
  readonly skippable: boolean;
  /** Frame_Content_Size when the header has it. */
  readonly contentSize: number | null;
  readonly windowSize: number;
  readonly checksum: boolean;
  readonly singleSegment: boolean;
}

function label(where: string | undefined): string {
  return where ?? 'compressed cluster';
}

function hex(n: number): string {
  return `0x${(n >>> 0).toString(16).padStart(8, '0')}`;
}

function u32le(b: Uint8Array, p: number): number {
  return (b[p]! | (b[p + 1]! << 8) | (b[p + 2]! << 16) | (b[p + 3]! << 24)) >>> 0;
}

/**
 * Parses the frame that starts at `pos`: its header, then each block header, skipping the
 * block contents. `room` is how many output bytes the frame may produce (what is left of
 * the cluster). Throws CorruptImageError naming the problem; never reads out of bounds.
 */
export function parseZstdFrame(input: Uint8Array, pos: number, room: number, where?: string): ZstdFrame {
  const at = `${label(where)}: zstd frame at input byte ${pos}`;
  const need = (end: number, what: string): void => {
    if (end > input.length) throw new CorruptImageError(`${at} truncated (${what} ends at byte ${end}, data ends at ${input.length})`);
  };
  need(pos + 4, 'magic number');
  const magic = u32le(input, pos);
  if (((magic & SKIPPABLE_MAGIC_MASK) >>> 0) === SKIPPABLE_MAGIC) {
    need(pos + 8, 'skippable frame header');
    const end = pos + 8 + u32le(input, pos + 4);
    need(end, 'skippable frame');
    return { start: pos, end, skippable: true, contentSize: 0, windowSize: 0, checksum: false, singleSegment: false };
  }
  if (magic !== ZSTD_MAGIC) {
    throw new CorruptImageError(`${label(where)}: no zstd frame at input byte ${pos} (magic ${hex(magic)}, expected ${hex(ZSTD_MAGIC)})`);
  }
  need(pos + 5, 'frame header descriptor');
  const fhd = input[pos + 4]!;
  const fcsFlag = fhd >> 6;
  const singleSegment = (fhd & 0x20) !== 0;
  const checksum = (fhd & 0x04) !== 0;
  const dictFlag = fhd & 0x03;
  if (fhd & 0x08) throw new CorruptImageError(`${at}: reserved bit set in the frame header descriptor`);
  let p = pos + 5;

  let windowSize = 0;
  if (!singleSegment) {
    need(p + 1, 'window descriptor');
    const wd = input[p++]!;
    const windowLog = 10 + (wd >> 3);
    const base = 2 ** windowLog;
    windowSize = base + (base / 8) * (wd & 7);
  }

  const dictSize = [0, 1, 2, 4][dictFlag]!;
  need(p + dictSize, 'dictionary id');
  let dictId = 0;
  for (let i = dictSize - 1; i >= 0; i--) dictId = dictId * 256 + input[p + i]!;
  p += dictSize;
  if (dictId !== 0) throw new CorruptImageError(`${at}: frame needs zstd dictionary ${dictId}, and qcow2 has none`);

  const fcsSize = [singleSegment ? 1 : 0, 2, 4, 8][fcsFlag]!;
  need(p + fcsSize, 'frame content size');
  let contentSize: number | null = null;
  if (fcsSize > 0) {
    let v = 0;
    for (let i = fcsSize - 1; i >= 0; i--) v = v * 256 + input[p + i]!;
    contentSize = fcsSize === 2 ? v + 256 : v;
  }
  p += fcsSize;
  if (singleSegment) windowSize = contentSize!;

  if (contentSize !== null && contentSize > room) {
    throw new CorruptImageError(`${at}: frame holds ${contentSize} bytes, more than the ${room} left in the cluster`);
  }
  if (windowSize > ZSTD_WINDOW_MAX) {
    throw new CorruptImageError(`${at}: frame asks for a ${windowSize}-byte window, more than zstd decoders accept (${ZSTD_WINDOW_MAX})`);
  }

  // Blocks: 3-byte little-endian header, bit 0 last block, bits 1-2 type, bits 3-23 size.
  const blockMax = Math.min(windowSize, BLOCK_SIZE_MAX);
  let produced = 0; // known lower bound of the output (raw and RLE blocks)
  for (;;) {
    need(p + 3, 'block header');
    const bh = input[p]! | (input[p + 1]! << 8) | (input[p + 2]! << 16);
    p += 3;
    const last = (bh & 1) !== 0;
    const type = (bh >> 1) & 3;
    const size = bh >>> 3;
    switch (type) {
      case 0: // raw
      case 1: // RLE: one byte, repeated `size` times
        if (size > blockMax) throw new CorruptImageError(`${at}: ${size}-byte block larger than the frame's maximum of ${blockMax}`);
        produced += size;
        if (produced > room) throw new CorruptImageError(`${at}: frame holds more than the ${room} bytes left in the cluster`);
        p += type === 0 ? size : 1;
        break;
      case 2: // compressed
        if (size > blockMax) throw new CorruptImageError(`${at}: ${size}-byte compressed block larger than the frame's maximum of ${blockMax}`);
        p += size;
        break;
      default:
        throw new CorruptImageError(`${at}: block of reserved type 3 at input byte ${p - 3}`);
    }
    need(p, 'block');
    if (last) break;
  }
  if (checksum) {
    p += 4;
    need(p, 'content checksum');
  }
  return { start: pos, end: p, skippable: false, contentSize, windowSize, checksum, singleSegment };
}

// ---------------------------------------------------------------------------------------
// Backends

interface Backend {
  readonly name: string;
  /** Decodes one complete frame (no trailing bytes) into dst; returns the bytes written. */
  decodeFrame(frame: Uint8Array, dst: Uint8Array): number;
  decodeFrameAsync(frame: Uint8Array, dst: Uint8Array): Promise<number>;
  /** One frame at the default level with its content size; null when not smaller than the input. */
  compress(input: Uint8Array): Uint8Array | null;
  compressAsync(input: Uint8Array): Promise<Uint8Array | null>;
  /** Stops worker threads, if the backend started any. */
  terminate(): Promise<void>;
}

type Callback = (err: Error | null, result: Buffer) => void;
interface NodeZstd {
  zstdCompressSync(buf: Uint8Array, opts?: object): Buffer;
  zstdDecompressSync(buf: Uint8Array, opts?: object): Buffer;
  zstdCompress(buf: Uint8Array, opts: object, cb: Callback): void;
  zstdDecompress(buf: Uint8Array, opts: object, cb: Callback): void;
}

function isTooLarge(err: unknown): boolean {
  return (err as NodeJS.ErrnoException | undefined)?.code === 'ERR_BUFFER_TOO_LARGE';
}

/** node:zlib's zstd, Node >= 22.15 (and Electron builds on it). */
function nodeBackend(): Backend | undefined {
  const z = zlib() as unknown as Partial<NodeZstd>;
  if (typeof z.zstdDecompressSync !== 'function' || typeof z.zstdCompressSync !== 'function'
    || typeof z.zstdCompress !== 'function' || typeof z.zstdDecompress !== 'function') return undefined;
  const nz = z as NodeZstd;
  // chunkSize above the room: the whole frame decodes in one call into one buffer, which
  // also lets zstd decode straight into it instead of through a window buffer.
  const decodeOpts = (room: number) => ({ chunkSize: Math.max(64, room + 1), maxOutputLength: room });
  const encodeOpts = (len: number) => ({ chunkSize: Math.max(64, len), maxOutputLength: len - 1, pledgedSrcSize: len });
  const place = (out: Buffer, dst: Uint8Array): number => {
    dst.set(out);
    return out.length;
  };
  const compressed = (out: Buffer, len: number): Uint8Array | null => (out.length >= len ? null : new Uint8Array(out));
  return {
    name: `node:zlib (libzstd ${process.versions.zstd ?? 'unknown version'})`,
    decodeFrame: (frame, dst) => place(nz.zstdDecompressSync(frame, decodeOpts(dst.length)), dst),
    decodeFrameAsync: (frame, dst) => new Promise((resolve, reject) => {
      nz.zstdDecompress(frame, decodeOpts(dst.length), (err, out) => {
        if (err) reject(err);
        else resolve(place(out, dst));
      });
    }),
    compress: (input) => {
      if (input.length < 2) return null;
      try {
        return compressed(nz.zstdCompressSync(input, encodeOpts(input.length)), input.length);
      } catch (err) {
        if (isTooLarge(err)) return null;
        throw err;
      }
    },
    compressAsync: (input) => {
      if (input.length < 2) return Promise.resolve(null);
      return new Promise((resolve, reject) => {
        nz.zstdCompress(input, encodeOpts(input.length), (err, out) => {
          if (err) {
            if (isTooLarge(err)) resolve(null);
            else reject(err);
          } else resolve(compressed(out, input.length));
        });
      });
    },
    terminate: () => Promise.resolve(),
  };
}

interface ZstdNapiBinding {
  DCtx: new () => { decompress(dst: Uint8Array, src: Uint8Array): number };
  CCtx: new () => { compress2(dst: Uint8Array, src: Uint8Array): number };
  compressBound(size: number): number;
  versionString(): string;
}

/** Runs in each worker: zstd-napi has no async API, so async compression goes to threads. */
const WORKER_SOURCE = `
const { parentPort, workerData } = require('node:worker_threads');
const b = require(workerData.bindingPath);
const cctx = new b.CCtx();
let scratch = new Uint8Array(0);
parentPort.on('message', (m) => {
  try {
    const input = m.input;
    const bound = b.compressBound(input.length);
    if (scratch.length < bound) scratch = new Uint8Array(bound);
    const n = cctx.compress2(scratch, input);
    if (n >= input.length) { parentPort.postMessage({ id: m.id, out: null }); return; }
    const out = scratch.slice(0, n);
    parentPort.postMessage({ id: m.id, out }, [out.buffer]);
  } catch (e) {
    parentPort.postMessage({ id: m.id, error: String((e && e.message) || e) });
  }
});
parentPort.postMessage({ ready: true });
`;

interface Job {
  input: Uint8Array;
  resolve: (v: Uint8Array | null) => void;
  reject: (e: unknown) => void;
}

interface PoolWorker {
  worker: Worker;
  pending: Map<number, Job>;
  ready: boolean;
  dead: boolean;
}

type WorkerReply = { ready: true } | { id: number; out: Uint8Array | null } | { id: number; error: string };

/**
 * A small pool of worker threads for zstd-napi compression, one per core, created on first
 * use and unref'd while idle so they never keep a process alive. If a worker cannot start
 * (say the native module does not load in a worker), its jobs and all later ones run on
 * the calling thread instead. Exported for tests.
 */
export class CompressPool {
  private readonly workers: PoolWorker[] = [];
  private nextId = 1;
  private disabled = false;

  constructor(private readonly bindingPath: string, private readonly fallback: (input: Uint8Array) => Uint8Array | null,
    private readonly size: number) {}

  run(input: Uint8Array): Promise<Uint8Array | null> {
    const w = this.disabled || input.length < 2 ? undefined : this.pick();
    if (!w) {
      // Now, before the caller can change its buffer.
      try {
        return Promise.resolve(this.fallback(input));
      } catch (e) {
        return Promise.reject(e);
      }
    }
    // Our own copy of exactly the input (not input.slice(): on a Buffer that is a view), so
    // the caller may reuse its buffer at once. It is cloned, not transferred, to the worker:
    // if the worker dies, the job still runs here from this copy.
    const copy = new Uint8Array(input);
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      if (w.pending.size === 0) w.worker.ref();
      w.pending.set(id, { input: copy, resolve, reject });
      w.worker.postMessage({ id, input: copy });
    });
  }

  /** Stops the workers; jobs still in flight finish on the calling thread. */
  async terminate(): Promise<void> {
    const all = this.workers.splice(0);
    await Promise.all(all.map((w) => {
      w.dead = true;
      this.settleHere(w);
      return w.worker.terminate();
    }));
  }

  private settleHere(w: PoolWorker): void {
    for (const job of w.pending.values()) {
      try { job.resolve(this.fallback(job.input)); } catch (e) { job.reject(e); }
    }
    w.pending.clear();
  }

  private pick(): PoolWorker | undefined {
    let best: PoolWorker | undefined;
    for (const w of this.workers) if (!best || w.pending.size < best.pending.size) best = w;
    if ((!best || best.pending.size > 0) && this.workers.length < this.size) {
      const w = this.spawn();
      if (w) return w;
    }
    return best;
  }

  private spawn(): PoolWorker | undefined {
    let worker: Worker;
    try {
      worker = new (workerThreads().Worker)(WORKER_SOURCE, { eval: true, workerData: { bindingPath: this.bindingPath } });
    } catch {
      this.disabled = true;
      return undefined;
    }
    worker.unref();
    const w: PoolWorker = { worker, pending: new Map(), ready: false, dead: false };
    worker.on('message', (m: WorkerReply) => {
      if ('ready' in m) { w.ready = true; return; }
      const job = w.pending.get(m.id);
      if (!job) return;
      w.pending.delete(m.id);
      if (w.pending.size === 0) worker.unref();
      if ('error' in m) job.reject(new Error(`zstd compression failed: ${m.error}`));
      else job.resolve(m.out);
    });
    const lost = (): void => {
      if (w.dead) return;
      w.dead = true;
      const i = this.workers.indexOf(w);
      if (i >= 0) this.workers.splice(i, 1);
      // A worker that never came up will not come up next time either.
      if (!w.ready) this.disabled = true;
      this.settleHere(w);
    };
    worker.on('error', lost);
    worker.on('exit', lost);
    this.workers.push(w);
    return w;
  }
}

/** A require() for native modules, in ESM (import.meta.url) or when bundled as CommonJS. */
function nativeRequire(): NodeJS.Require {
  try {
    return createRequire(import.meta.url);
  } catch {
    // Bundled as CommonJS, import.meta is empty; there require() exists.
    if (typeof require === 'function') return require;
    throw new Error('no require() to load native modules with');
  }
}

/** zstd-napi: N-API bindings to libzstd, built from source at install. */
function napiBackend(): Backend | undefined {
  let b: ZstdNapiBinding;
  let bindingPath: string;
  try {
    const nodeRequire = nativeRequire();
    bindingPath = nodeRequire.resolve('zstd-napi/binding');
    b = nodeRequire(bindingPath) as ZstdNapiBinding;
  } catch {
    return undefined;
  }
  const dctx = new b.DCtx();
  const cctx = new b.CCtx();
  let scratch = new Uint8Array(0);
  const compress = (input: Uint8Array): Uint8Array | null => {
    if (input.length < 2) return null;
    const bound = b.compressBound(input.length);
    if (scratch.length < bound) scratch = new Uint8Array(bound);
    const n = cctx.compress2(scratch, input);
    return n >= input.length ? null : scratch.slice(0, n);
  };
  let pool: CompressPool | undefined;
  const decodeFrame = (frame: Uint8Array, dst: Uint8Array): number => dctx.decompress(dst, frame);
  return {
    name: `zstd-napi (libzstd ${b.versionString()})`,
    decodeFrame,
    // Decoding a cluster takes tens of microseconds: a thread hop would cost more.
    decodeFrameAsync: async (frame, dst) => decodeFrame(frame, dst),
    compress,
    compressAsync: (input) => {
      pool ??= new CompressPool(bindingPath, compress, Math.max(1, availableParallelism()));
      return pool.run(input);
    },
    terminate: () => pool?.terminate() ?? Promise.resolve(),
  };
}

export type ZstdBackendId = 'node:zlib' | 'zstd-napi';
const FACTORIES: Record<ZstdBackendId, () => Backend | undefined> = { 'node:zlib': nodeBackend, 'zstd-napi': napiBackend };
const made = new Map<ZstdBackendId, Backend | null>();
let current: Backend | null | undefined;

function make(id: ZstdBackendId): Backend | null {
  if (!made.has(id)) made.set(id, FACTORIES[id]() ?? null);
  return made.get(id)!;
}

function backend(): Backend | null {
  if (current === undefined) current = make('node:zlib') ?? make('zstd-napi');
  return current;
}

/** The zstd implementations that load here, preferred first. */
export function availableZstdBackends(): ZstdBackendId[] {
  return (Object.keys(FACTORIES) as ZstdBackendId[]).filter((id) => make(id) !== null);
}

/** Switches to another zstd implementation (tests, troubleshooting); false if it does not load. */
export function selectZstdBackend(id: ZstdBackendId): boolean {
  const b = make(id);
  if (b) current = b;
  return b !== null;
}

function requireBackend(): Backend {
  const b = backend();
  if (!b) {
    throw new UnsupportedFeatureError('zstd-compressed clusters need zstd support: Node.js >= 22.15 or the zstd-napi package (npm install zstd-napi)');
  }
  return b;
}

/** Which zstd implementation is in use, or 'none'. */
export function zstdBackendName(): string {
  return backend()?.name ?? 'none';
}

/** Stops the compression worker threads, if any were started. */
export async function terminateZstdWorkers(): Promise<void> {
  await Promise.all([...made.values()].map((b) => b?.terminate()));
}

// ---------------------------------------------------------------------------------------
// Clusters

function decodeError(where: string | undefined, frame: ZstdFrame, err: unknown): CorruptImageError {
  const msg = err instanceof Error ? err.message : String(err);
  const why = isTooLarge(err) ? 'frame holds more than the rest of the cluster' : msg;
  return new CorruptImageError(`${label(where)}: zstd frame at input byte ${frame.start}: ${why}`);
}

function checkLength(where: string | undefined, frame: ZstdFrame, n: number): void {
  if (frame.contentSize !== null && n !== frame.contentSize) {
    throw new CorruptImageError(`${label(where)}: zstd frame at input byte ${frame.start} decoded to ${n} bytes, its header says ${frame.contentSize}`);
  }
}

function ranOut(where: string | undefined, inPos: number, outPos: number, out: Uint8Array): CorruptImageError {
  return new CorruptImageError(`${label(where)}: zstd data ends at input byte ${inPos} with ${outPos} of ${out.length} bytes decompressed`);
}

/**
 * The frames to decode, in order, until `out` is full (as QEMU does): each is handed to
 * `decode(frame, outPos)`, which returns the bytes it produced. Sync and async share this walk.
 */
function* frameWalk(input: Uint8Array, out: Uint8Array, where: string | undefined): Generator<ZstdFrame, void, number> {
  let inPos = 0;
  let outPos = 0;
  while (outPos < out.length) {
    if (inPos >= input.length) throw ranOut(where, inPos, outPos, out);
    const frame = parseZstdFrame(input, inPos, out.length - outPos, where);
    if (!frame.skippable) {
      const n: number = yield frame;
      checkLength(where, frame, n);
      outPos += n;
    }
    inPos = frame.end;
  }
}

/** Decompresses frames from `input` into `out` until it is full, as QEMU does. */
export function zstdDecompressCluster(input: Uint8Array, out: Uint8Array, where?: string): void {
  const b = requireBackend();
  const walk = frameWalk(input, out, where);
  let outPos = 0;
  for (let r = walk.next(0); !r.done; ) {
    const frame = r.value;
    let n: number;
    try {
      n = b.decodeFrame(input.subarray(frame.start, frame.end), out.subarray(outPos));
    } catch (err) {
      throw decodeError(where, frame, err);
    }
    r = walk.next(n);
    outPos += n;
  }
}

export async function zstdDecompressClusterAsync(input: Uint8Array, out: Uint8Array, where?: string): Promise<void> {
  const b = requireBackend();
  const walk = frameWalk(input, out, where);
  let outPos = 0;
  for (let r = walk.next(0); !r.done; ) {
    const frame = r.value;
    let n: number;
    try {
      n = await b.decodeFrameAsync(input.subarray(frame.start, frame.end), out.subarray(outPos));
    } catch (err) {
      throw decodeError(where, frame, err);
    }
    r = walk.next(n);
    outPos += n;
  }
}

/** One zstd frame at the default level, as QEMU writes; null when not smaller than the input. */
export function zstdCompressCluster(input: Uint8Array): Uint8Array | null {
  return requireBackend().compress(input);
}

export function zstdCompressClusterAsync(input: Uint8Array): Promise<Uint8Array | null> {
  try {
    return requireBackend().compressAsync(input);
  } catch (err) {
    return Promise.reject(err);
  }
}
