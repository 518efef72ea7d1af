// A read-only NBD client over plain node:net (TCP or a unix socket), as the NBD protocol
// (the fixed newstyle handshake and the transmission phase) describes it: structured replies,
// one metadata context (base:allocation, or what QEMU's x-dirty-bitmap option asks for),
// NBD_OPT_GO with block size constraints, reads and block status. Every byte the server sends
// is checked (magics, lengths, handles, offsets, sizes) before it is used; buffers are bounded
// by what was asked for, and a server that stops answering times out. Errors name the export
// (its QEMU pseudo-filename) and the problem in one line.
import type { Socket } from 'node:net';
import { net } from '../codec/builtins';
import { IoError, NotFoundError, UnsupportedFeatureError, printable } from '../errors';
import type { BlockFile } from './block-file';

export type NbdServer =
  | { type: 'unix'; path: string }
  | { type: 'inet'; host: string; port: string };

/** What to connect to: QEMU's nbd driver options (server, export, x-dirty-bitmap). */
export interface NbdTarget {
  server: NbdServer;
  /** null: no export given (the default export, named ''). */
  export: string | null;
  /** A metadata context read in place of base:allocation (QEMU's x-dirty-bitmap hack). */
  xDirtyBitmap?: string;
}

/** The name QEMU gives an nbd node (nbd_refresh_filename). */
export function nbdFilename(t: NbdTarget): string {
  if (t.server.type === 'unix') {
    return t.export !== null ? `nbd+unix:///${t.export}?socket=${t.server.path}` : `nbd+unix://?socket=${t.server.path}`;
  }
  return t.export !== null ? `nbd://${t.server.host}:${t.server.port}/${t.export}` : `nbd://${t.server.host}:${t.server.port}`;
}

// Protocol constants (the NBD protocol document, doc/proto.md).
const NBDMAGIC = 0x4e42444d41474943n;
const IHAVEOPT = 0x49484156454f5054n;
const OLD_STYLE_MAGIC = 0x00420281861253n;
const OPT_REPLY_MAGIC = 0x3e889045565a9n;
const REQUEST_MAGIC = 0x25609513;
const SIMPLE_REPLY_MAGIC = 0x67446698;
const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

const FLAG_FIXED_NEWSTYLE = 1;
const FLAG_NO_ZEROES = 2;

const OPT_EXPORT_NAME = 1;
const OPT_ABORT = 2;
const OPT_GO = 7;
const OPT_STRUCTURED_REPLY = 8;
const OPT_SET_META_CONTEXT = 10;

const REP_ACK = 1;
const REP_INFO = 3;
const REP_META_CONTEXT = 4;
const REP_ERR_UNSUP = 0x80000001;
const REP_ERRORS: Record<number, string> = {
  0x80000001: 'unsupported', 0x80000002: 'denied by policy', 0x80000003: 'invalid', 0x80000004: 'not supported on this platform',
  0x80000005: 'TLS required', 0x80000006: 'unknown export', 0x80000007: 'server shutting down', 0x80000008: 'block size required',
  0x80000009: 'request too big',
};

const INFO_EXPORT = 0;
const INFO_BLOCK_SIZE = 3;

const CMD_READ = 0;
const CMD_DISC = 2;
const CMD_BLOCK_STATUS = 7;
const CMD_FLAG_REQ_ONE = 8;

const REPLY_FLAG_DONE = 1;
const REPLY_TYPE_NONE = 0;
const REPLY_TYPE_OFFSET_DATA = 1;
const REPLY_TYPE_OFFSET_HOLE = 2;
const REPLY_TYPE_BLOCK_STATUS = 5;
const REPLY_TYPE_ERROR = 0x8001;
const REPLY_TYPE_ERROR_OFFSET = 0x8002;

const STATE_HOLE = 1;
const STATE_ZERO = 2;

/** Transmission flag: the export is read-only. */
export const NBD_FLAG_READ_ONLY = 2;

/** The largest read sent in one request (QEMU's NBD_MAX_BUFFER_SIZE). */
const MAX_BUFFER = 32 << 20;
/** Strings in the protocol (export and context names, error messages) are at most this long. */
const MAX_STRING = 4096;
/** Option replies and non-data chunks longer than this are refused. */
const MAX_SMALL_PAYLOAD = 64 << 10;
/** Block status payloads (context id and extents) longer than this are refused. */
const MAX_STATUS_PAYLOAD = 1 << 20;
/** Buffered but not yet wanted bytes past which the socket is paused. */
const HIGH_WATER = 4 << 20;

const ERRNO: Record<number, string> = {
  1: 'EPERM', 5: 'EIO', 12: 'ENOMEM', 22: 'EINVAL', 28: 'ENOSPC', 75: 'EOVERFLOW', 95: 'ENOTSUP', 108: 'ESHUTDOWN',
};

/** How long the server may stay silent while an answer is awaited (STRATA_NBD_TIMEOUT in seconds). */
function timeoutMs(): number {
  const v = Number(process.env.STRATA_NBD_TIMEOUT);
  return Number.isFinite(v) && v > 0 ? v * 1000 : 30_000;
}

/** Bytes from the socket, handed out in exact amounts, with a silence timeout and back-pressure. */
class Wire {
  private chunks: Buffer[] = [];
  private have = 0;
  private waiter: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | null = null;
  private timer: NodeJS.Timeout | null = null;
  failure: Error | null = null;

  constructor(private readonly sock: Socket, private readonly fail: (msg: string) => Error, private readonly ms: number) {
    sock.on('data', (d: Buffer) => {
      this.chunks.push(d);
      this.have += d.length;
      if (this.waiter) this.arm();
      this.serve();
      if (this.have >= Math.max(HIGH_WATER, this.waiter?.n ?? 0)) sock.pause();
    });
    sock.on('end', () => this.abort(this.fail('the server closed the connection')));
    sock.on('close', () => this.abort(this.fail('the server closed the connection')));
    sock.on('error', (err: NodeJS.ErrnoException) => this.abort(this.fail(`connection failed: ${err.code ?? err.message}`)));
  }

  private arm(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = setTimeout(() => {
      this.abort(this.fail(`the server sent no answer for ${this.ms / 1000} s`));
      this.sock.destroy();
    }, this.ms);
  }

  private take(n: number): Buffer {
    const out = Buffer.allocUnsafe(n);
    let at = 0;
    while (at < n) {
      const c = this.chunks[0]!;
      const k = Math.min(c.length, n - at);
      c.copy(out, at, 0, k);
      at += k;
      if (k === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(k);
    }
    this.have -= n;
    return out;
  }

  private serve(): void {
    const w = this.waiter;
    if (!w || this.have < w.n) return;
    this.waiter = null;
    if (this.timer) { clearTimeout(this.timer); this.timer = null; }
    w.resolve(this.take(w.n));
  }

  abort(err: Error): void {
    if (!this.failure) this.failure = err;
    if (this.timer) { clearTimeout(this.timer); this.timer = null; }
    const w = this.waiter;
    this.waiter = null;
    // Whatever is buffered is still handed out: a reply followed by a close is a reply.
    if (w) {
      if (this.have >= w.n) w.resolve(this.take(w.n));
      else w.reject(this.failure);
    }
  }

  /** Exactly n bytes (n bounded by the caller). */
  read(n: number): Promise<Buffer> {
    if (this.have >= n) {
      const b = this.take(n);
      if (this.have < HIGH_WATER) this.sock.resume();
      return Promise.resolve(b);
    }
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => {
      this.waiter = { n, resolve, reject };
      this.sock.resume();
      this.arm();
    });
  }
}

export interface NbdExtent {
  length: number;
  data: boolean;
  zero: boolean;
}

/** An NBD export opened read-only. */
export class NbdFile implements BlockFile {
  readonly writable = false;
  private handle = 0;
  private queue: Promise<unknown> = Promise.resolve();
  private closed = false;

  private constructor(
    /** The export's QEMU pseudo-filename: every error names it. */
    readonly path: string,
    private readonly sock: Socket,
    private readonly wire: Wire,
    readonly exportSize: number,
    readonly flags: number,
    readonly minBlock: number,
    readonly maxBlock: number,
    readonly structured: boolean,
    /** The metadata context's id, or null when the server offered none (no block status). */
    readonly contextId: number | null,
    private readonly allocDepth: boolean,
  ) {}

  /** Connections open in this process, by export and context, with their users. */
  private static pool = new Map<string, { file: Promise<NbdFile>; users: number; ready?: NbdFile }>();
  private key = '';

  /**
   * Connects to the export, or shares the connection this process already has to it: a
   * server commonly takes one client at a time (qemu-nbd's default), and a command may open
   * an image twice (a plan step, then the job).
   */
  static open(target: NbdTarget): Promise<NbdFile> {
    const key = JSON.stringify([nbdFilename(target), target.xDirtyBitmap ?? null]);
    const held = NbdFile.pool.get(key);
    if (held && !held.ready?.wire.failure) { held.users++; return held.file; }
    const entry: { file: Promise<NbdFile>; users: number; ready?: NbdFile } = { users: 1, file: NbdFile.connect(target).then((f) => { f.key = key; entry.ready = f; return f; }) };
    NbdFile.pool.set(key, entry);
    entry.file.catch(() => { if (NbdFile.pool.get(key) === entry) NbdFile.pool.delete(key); });
    return entry.file;
  }

  static async connect(target: NbdTarget): Promise<NbdFile> {
    const name = nbdFilename(target);
    const ms = timeoutMs();
    const fail = (msg: string) => new IoError(`NBD: ${msg}`, name);
    if (target.export !== null && Buffer.byteLength(target.export) > MAX_STRING) throw new UnsupportedFeatureError('the export name is longer than 4096 bytes', name);
    if (target.xDirtyBitmap !== undefined && Buffer.byteLength(target.xDirtyBitmap) > MAX_STRING) {
      throw new UnsupportedFeatureError('x-dirty-bitmap query too long to send to server', name).asQemu('x-dirty-bitmap query too long to send to server');
    }
    // node:net (and node:stream with it) is loaded only by a command that opens an export: a
    // plain convert starts without them.
    const { connect } = net();
    const sock = target.server.type === 'unix'
      ? connect({ path: target.server.path })
      : connect({ host: target.server.host, port: Number(target.server.port) });
    const wire = new Wire(sock, fail, ms);
    const connected = new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => { sock.destroy(); reject(fail(`could not connect within ${ms / 1000} s`)); }, ms);
      sock.once('connect', () => { clearTimeout(timer); resolve(); });
      sock.once('error', (err: NodeJS.ErrnoException) => {
        clearTimeout(timer);
        const where = target.server.type === 'unix' ? `'${printable(target.server.path)}'` : `${printable(target.server.host)}:${printable(target.server.port)}`;
        const e = err.code === 'ENOENT'
          ? new NotFoundError(`NBD: no server socket at ${where}`, name)
          : fail(`could not connect to ${where}: ${err.code === 'ECONNREFUSED' ? 'connection refused' : err.code === 'ENOTFOUND' ? 'no such host' : err.code ?? err.message}`);
        reject(e.asQemu(`Failed to connect to '${target.server.type === 'unix' ? target.server.path : `${target.server.host}:${target.server.port}`}': ${err.code === 'ENOENT' ? 'No such file or directory' : err.code === 'ECONNREFUSED' ? 'Connection refused' : err.message}`));
      });
    });
    try {
      await connected;
      const h = await handshake(sock, wire, target, fail, name);
      return new NbdFile(name, sock, wire, h.size, h.flags, h.minBlock, h.maxBlock, h.structured, h.contextId, target.xDirtyBitmap === 'qemu:allocation-depth');
    } catch (err) {
      sock.destroy();
      throw err;
    }
  }

  private fail(msg: string): IoError {
    const e = new IoError(`NBD: ${msg}`, this.path);
    this.wire.abort(e);
    this.sock.destroy();
    return e;
  }

  /** One request at a time: replies are then matched to the one request in flight. */
  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.queue.then(fn, fn);
    this.queue = run.catch(() => {});
    return run;
  }

  private send(type: number, flags: number, offset: number, length: number): number {
    if (this.wire.failure) throw this.wire.failure;
    if (this.closed) throw new IoError('NBD: the connection is closed', this.path);
    const handle = ++this.handle;
    const b = Buffer.alloc(28);
    b.writeUInt32BE(REQUEST_MAGIC, 0);
    b.writeUInt16BE(flags, 4);
    b.writeUInt16BE(type, 6);
    b.writeUInt32BE(0, 8);
    b.writeUInt32BE(handle, 12);
    b.writeBigUInt64BE(BigInt(offset), 16);
    b.writeUInt32BE(length, 24);
    this.sock.write(b);
    return handle;
  }

  /** Reads a reply header; returns it as a simple or a structured chunk header. */
  private async replyHeader(handle: number): Promise<{ simple: true; error: number } | { simple: false; flags: number; type: number; length: number }> {
    const m = (await this.wire.read(4)).readUInt32BE(0);
    if (m === SIMPLE_REPLY_MAGIC) {
      const b = await this.wire.read(12);
      this.checkHandle(b, 4, handle);
      return { simple: true, error: b.readUInt32BE(0) };
    }
    if (m === STRUCTURED_REPLY_MAGIC) {
      if (!this.structured) throw this.fail('the server sent a structured reply, which was not negotiated');
      const b = await this.wire.read(16);
      this.checkHandle(b, 4, handle);
      return { simple: false, flags: b.readUInt16BE(0), type: b.readUInt16BE(2), length: b.readUInt32BE(12) };
    }
    throw this.fail(`the server sent a reply with bad magic 0x${m.toString(16).padStart(8, '0')}`);
  }

  private checkHandle(b: Buffer, at: number, handle: number): void {
    const hi = b.readUInt32BE(at);
    const lo = b.readUInt32BE(at + 4);
    if (hi !== 0 || lo !== handle) throw this.fail(`the server replied to request 0x${hi.toString(16)}${lo.toString(16).padStart(8, '0')}, not to the one sent (0x${handle.toString(16)})`);
  }

  /** An error chunk's payload: the errno and the server's message. */
  private async errorChunk(type: number, length: number): Promise<string> {
    if (length < 6 || length > 6 + MAX_STRING + 8) throw this.fail(`the server sent an error chunk of invalid length ${length}`);
    const p = await this.wire.read(length);
    const errno = p.readUInt32BE(0);
    const msgLen = p.readUInt16BE(4);
    if (errno === 0) throw this.fail('the server sent an error chunk with error 0');
    if (6 + msgLen + (type === REPLY_TYPE_ERROR_OFFSET ? 8 : 0) !== length) throw this.fail('the server sent an error chunk whose message length does not match');
    const msg = p.subarray(6, 6 + msgLen).toString('utf8');
    return `${ERRNO[errno] ?? `error ${errno}`}${msg ? ` (${printable(msg)})` : ''}`;
  }

  private serverError(what: string, errno: number | string): IoError {
    const e = typeof errno === 'string' ? errno : ERRNO[errno] ?? `error ${errno}`;
    return new IoError(`NBD: ${what} failed: the server answered ${e}`, this.path);
  }

  async size(): Promise<number> { return this.exportSize; }

  /** The alignment reads and block status keep (the server's minimum block size, or 1). */
  get alignment(): number { return this.minBlock; }

  async read(buf: Uint8Array, offset: number): Promise<number> {
    const end = Math.min(offset + buf.length, this.exportSize);
    if (end < offset + buf.length) buf.fill(0, Math.max(0, end - offset));
    if (end <= offset) return 0;
    const a = this.minBlock;
    const max = Math.max(a, Math.floor(Math.min(this.maxBlock || MAX_BUFFER, MAX_BUFFER) / a) * a);
    for (let pos = offset; pos < end;) {
      // Each request starts and ends on the server's block size (the export's end excepted).
      const from = Math.floor(pos / a) * a;
      const to = Math.min(from + max, Math.min(Math.ceil(end / a) * a, this.exportSize));
      const n = Math.min(to, end) - pos;
      if (from === pos && to <= end) {
        await this.readRequest(buf.subarray(pos - offset, pos - offset + (to - from)), from);
      } else {
        const tmp = Buffer.alloc(to - from);
        await this.readRequest(tmp, from);
        buf.set(tmp.subarray(pos - from, pos - from + n), pos - offset);
      }
      pos += n;
    }
    return end - offset;
  }

  private readRequest(buf: Uint8Array, offset: number): Promise<void> {
    return this.serial(async () => {
      const len = buf.length;
      const handle = this.send(CMD_READ, 0, offset, len);
      let failure: string | null = null;
      // Chunks may not overlap: together they cover at most the request. Error chunks are few.
      let covered = 0;
      let errors = 0;
      const cover = (n: number) => {
        covered += n;
        if (covered > len) throw this.fail(`the server sent more than the ${len} bytes read at ${offset} (overlapping chunks)`);
      };
      for (;;) {
        const h = await this.replyHeader(handle);
        if (h.simple) {
          if (h.error !== 0) throw this.serverError(`reading ${len} bytes at ${offset}`, h.error);
          if (this.structured) throw this.fail('the server sent a simple reply with data to a read, after structured replies were negotiated');
          const data = await this.wire.read(len);
          buf.set(data);
          return;
        }
        switch (h.type) {
          case REPLY_TYPE_OFFSET_DATA: {
            if (h.length <= 8 || h.length - 8 > len) throw this.fail(`the server sent a data chunk of invalid length ${h.length} for a read of ${len} bytes`);
            const at = Number((await this.wire.read(8)).readBigUInt64BE(0));
            const n = h.length - 8;
            if (at < offset || at + n > offset + len) throw this.fail(`the server sent data for [${at}, ${at + n}), outside the read of [${offset}, ${offset + len})`);
            cover(n);
            buf.set(await this.wire.read(n), at - offset);
            break;
          }
          case REPLY_TYPE_OFFSET_HOLE: {
            if (h.length !== 12) throw this.fail(`the server sent a hole chunk of invalid length ${h.length}`);
            const p = await this.wire.read(12);
            const at = Number(p.readBigUInt64BE(0));
            const n = p.readUInt32BE(8);
            if (n === 0 || at < offset || at + n > offset + len) throw this.fail(`the server sent a hole for [${at}, ${at + n}), outside the read of [${offset}, ${offset + len})`);
            cover(n);
            buf.fill(0, at - offset, at - offset + n);
            break;
          }
          case REPLY_TYPE_NONE:
            if (h.length !== 0) throw this.fail(`the server sent a final chunk of invalid length ${h.length}`);
            if (!(h.flags & REPLY_FLAG_DONE)) throw this.fail('the server sent a final chunk without the done flag');
            break;
          default:
            if (h.type & 0x8000) {
              if (++errors > 16) throw this.fail('the server sent too many error chunks for one read');
              failure ??= await this.errorChunk(h.type, h.length);
              break;
            }
            throw this.fail(`the server sent an unexpected chunk type ${h.type} in reply to a read`);
        }
        if (h.flags & REPLY_FLAG_DONE) break;
      }
      if (failure !== null) throw this.serverError(`reading ${len} bytes at ${offset}`, failure);
    });
  }

  /**
   * The first run's status at `offset` (at most `bytes`), from the metadata context: as QEMU's
   * nbd driver reads it, bit 0 is a hole (no data) and bit 1 reads as zero. Null when the
   * server offered no context (everything is then data).
   */
  blockStatus(offset: number, bytes: number): Promise<NbdExtent | null> {
    if (this.contextId === null) return Promise.resolve(null);
    const a = this.minBlock;
    const len = Math.min(Math.floor(0x7fffffff / a) * a, bytes, this.exportSize - offset);
    return this.serial(async () => {
      const handle = this.send(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, offset, len);
      let extent: { length: number; flags: number } | null = null;
      let failure: string | null = null;
      let errors = 0;
      for (;;) {
        const h = await this.replyHeader(handle);
        if (h.simple) {
          if (h.error !== 0) throw this.serverError(`block status at ${offset}`, h.error);
          throw this.fail('the server sent a simple reply without an error to a block status request');
        }
        if (h.type === REPLY_TYPE_BLOCK_STATUS) {
          if (h.length < 12 || (h.length - 4) % 8 !== 0 || h.length > MAX_STATUS_PAYLOAD) throw this.fail(`the server sent a block status chunk of invalid length ${h.length}`);
          if (extent) throw this.fail('the server sent several block status chunks for one request');
          const p = await this.wire.read(h.length);
          const id = p.readUInt32BE(0);
          if (id !== this.contextId) throw this.fail(`the server sent block status for context ${id}, not the negotiated one (${this.contextId})`);
          extent = { length: p.readUInt32BE(4), flags: p.readUInt32BE(8) };
          if (extent.length === 0) throw this.fail('the server sent a block status extent of length 0');
        } else if (h.type === REPLY_TYPE_NONE) {
          if (h.length !== 0 || !(h.flags & REPLY_FLAG_DONE)) throw this.fail('the server sent an invalid final chunk');
        } else if (h.type & 0x8000) {
          if (++errors > 16) throw this.fail('the server sent too many error chunks for one block status request');
          failure ??= await this.errorChunk(h.type, h.length);
        } else {
          throw this.fail(`the server sent an unexpected chunk type ${h.type} in reply to a block status request`);
        }
        if (h.flags & REPLY_FLAG_DONE) break;
      }
      if (failure !== null) throw this.serverError(`block status at ${offset}`, failure);
      if (!extent) throw this.fail('the server sent no block status');
      // As QEMU's client: an unaligned extent is cut back to the block size (or, when that
      // is all there is, rounded up to a whole block and taken as data); a longer one than
      // asked for is clamped; depths past 2 of qemu:allocation-depth read as 2.
      if (a > 1 && extent.length % a !== 0) {
        if (extent.length > a) extent.length -= extent.length % a;
        else { extent.length = a; extent.flags = 0; }
      }
      extent.length = Math.min(extent.length, len);
      if (this.allocDepth && extent.flags > 2) extent.flags = 2;
      return { length: extent.length, data: !(extent.flags & STATE_HOLE), zero: (extent.flags & STATE_ZERO) !== 0 };
    });
  }

  async write(): Promise<void> { throw new UnsupportedFeatureError('Strata\'s NBD client is read-only', this.path); }
  async truncate(): Promise<void> { throw new UnsupportedFeatureError('Strata\'s NBD client is read-only', this.path); }
  async flush(): Promise<void> {}

  async close(): Promise<void> {
    if (this.closed) return;
    const entry = NbdFile.pool.get(this.key);
    if (entry?.ready === this) {
      if (--entry.users > 0) return;
      NbdFile.pool.delete(this.key);
    }
    await this.queue;
    this.closed = true;
    if (!this.wire.failure) {
      try { this.send(CMD_DISC, 0, 0, 0); } catch { /* already gone */ }
      this.wire.abort(new IoError('NBD: the connection is closed', this.path));
      await new Promise<void>((resolve) => this.sock.end(resolve));
    }
    this.sock.destroy();
  }
}

interface Negotiated {
  size: number;
  flags: number;
  minBlock: number;
  maxBlock: number;
  structured: boolean;
  contextId: number | null;
}

/** The fixed newstyle handshake up to the transmission phase. */
async function handshake(sock: Socket, wire: Wire, target: NbdTarget, fail: (msg: string) => Error, name: string): Promise<Negotiated> {
  const bad = (msg: string) => { const e = fail(msg); wire.abort(e); return e; };
  const head = await wire.read(16);
  if (head.readBigUInt64BE(0) !== NBDMAGIC) throw bad('the server did not greet as an NBD server (bad magic)');
  const second = head.readBigUInt64BE(8);
  if (second === OLD_STYLE_MAGIC) throw bad('the server speaks only the old-style handshake, which Strata does not');
  if (second !== IHAVEOPT) throw bad(`the server greeted with an unknown magic 0x${second.toString(16)}`);
  const gflags = (await wire.read(2)).readUInt16BE(0);
  if (!(gflags & FLAG_FIXED_NEWSTYLE)) throw bad('the server does not offer the fixed newstyle handshake');
  const noZeroes = (gflags & FLAG_NO_ZEROES) !== 0;
  const cflags = Buffer.alloc(4);
  cflags.writeUInt32BE(FLAG_FIXED_NEWSTYLE | (noZeroes ? FLAG_NO_ZEROES : 0));
  sock.write(cflags);

  const sendOpt = (opt: number, data: Buffer) => {
    const b = Buffer.alloc(16);
    b.writeBigUInt64BE(IHAVEOPT, 0);
    b.writeUInt32BE(opt, 8);
    b.writeUInt32BE(data.length, 12);
    sock.write(Buffer.concat([b, data]));
  };
  let replies = 0;
  const optReply = async (opt: number): Promise<{ type: number; data: Buffer }> => {
    if (++replies > 1000) throw bad('the server sent more than 1000 option replies');
    const h = await wire.read(20);
    if (h.readBigUInt64BE(0) !== OPT_REPLY_MAGIC) throw bad('the server sent an option reply with bad magic');
    const got = h.readUInt32BE(8);
    if (got !== opt) throw bad(`the server answered option ${got} where option ${opt} was asked`);
    const type = h.readUInt32BE(12);
    const len = h.readUInt32BE(16);
    if (len > MAX_SMALL_PAYLOAD) throw bad(`the server sent an option reply of ${len} bytes`);
    return { type, data: len ? await wire.read(len) : Buffer.alloc(0) };
  };
  const repError = (r: { type: number; data: Buffer }) =>
    `${REP_ERRORS[r.type] ?? `error 0x${r.type.toString(16)}`}${r.data.length ? ` (${printable(r.data.subarray(0, MAX_STRING).toString('utf8'))})` : ''}`;
  const exportName = Buffer.from(target.export ?? '', 'utf8');
  const withName = (rest: Buffer) => {
    const l = Buffer.alloc(4);
    l.writeUInt32BE(exportName.length);
    return Buffer.concat([l, exportName, rest]);
  };

  // Structured replies (needed for block status).
  sendOpt(OPT_STRUCTURED_REPLY, Buffer.alloc(0));
  let r = await optReply(OPT_STRUCTURED_REPLY);
  let structured: boolean;
  if (r.type === REP_ACK) {
    if (r.data.length) throw bad('the server sent data with its acknowledgement of structured replies');
    structured = true;
  } else if (r.type & 0x80000000) {
    structured = false;
  } else {
    throw bad(`the server answered structured replies with reply type ${r.type}`);
  }

  // One metadata context: base:allocation, or the x-dirty-bitmap query.
  let contextId: number | null = null;
  const query = target.xDirtyBitmap ?? 'base:allocation';
  if (structured) {
    const q = Buffer.from(query, 'utf8');
    const qs = Buffer.alloc(8 + q.length);
    qs.writeUInt32BE(1, 0);
    qs.writeUInt32BE(q.length, 4);
    q.copy(qs, 8);
    sendOpt(OPT_SET_META_CONTEXT, withName(qs));
    for (;;) {
      r = await optReply(OPT_SET_META_CONTEXT);
      if (r.type === REP_META_CONTEXT) {
        if (r.data.length < 4 || r.data.length > 4 + MAX_STRING) throw bad(`the server sent a metadata context reply of invalid length ${r.data.length}`);
        const got = r.data.subarray(4).toString('utf8');
        if (got !== query) throw bad(`the server replied with the metadata context '${printable(got)}', which was not asked for`);
        if (contextId !== null) throw bad('the server replied with more than one metadata context');
        contextId = r.data.readUInt32BE(0);
      } else if (r.type === REP_ACK) {
        if (r.data.length) throw bad('the server sent data with its acknowledgement of metadata contexts');
        break;
      } else if (r.type & 0x80000000) {
        contextId = null;
        break;
      } else {
        throw bad(`the server answered the metadata context request with reply type ${r.type}`);
      }
    }
  }
  if (target.xDirtyBitmap !== undefined && contextId === null) {
    const e = new NotFoundError(`requested x-dirty-bitmap ${printable(target.xDirtyBitmap)} not found`, name);
    wire.abort(e);
    throw e;
  }

  // NBD_OPT_GO, asking for the block size constraints.
  const infos = Buffer.alloc(4);
  infos.writeUInt16BE(1, 0);
  infos.writeUInt16BE(INFO_BLOCK_SIZE, 2);
  sendOpt(OPT_GO, withName(infos));
  let size: number | null = null;
  let flags = 0;
  let minBlock = 0;
  let prefBlock = 0;
  let maxBlock = 0;
  for (;;) {
    r = await optReply(OPT_GO);
    if (r.type === REP_INFO) {
      if (r.data.length < 2) throw bad('the server sent an information reply without its type');
      const t = r.data.readUInt16BE(0);
      if (t === INFO_EXPORT) {
        if (r.data.length !== 12) throw bad(`the server sent export information of invalid length ${r.data.length}`);
        const s = r.data.readBigUInt64BE(2);
        if (s > BigInt(Number.MAX_SAFE_INTEGER)) throw bad(`the server announced an export size of ${s} bytes, past what Strata handles (2^53)`);
        size = Number(s);
        flags = r.data.readUInt16BE(10);
      } else if (t === INFO_BLOCK_SIZE) {
        if (r.data.length !== 14) throw bad(`the server sent block size information of invalid length ${r.data.length}`);
        minBlock = r.data.readUInt32BE(2);
        prefBlock = r.data.readUInt32BE(6);
        maxBlock = r.data.readUInt32BE(10);
        const pow2 = (n: number) => n > 0 && (n & (n - 1)) === 0;
        if (!pow2(minBlock) || minBlock > 64 << 10) throw bad(`the server sent an invalid minimum block size ${minBlock}`);
        if (!pow2(prefBlock) || prefBlock < minBlock) throw bad(`the server sent an invalid preferred block size ${prefBlock}`);
        if (maxBlock < minBlock || maxBlock % minBlock !== 0) throw bad(`the server sent an invalid maximum block size ${maxBlock}`);
      }
      // Other information (name, description) is not needed.
    } else if (r.type === REP_ACK) {
      break;
    } else if (r.type === REP_ERR_UNSUP && size === null) {
      // An older server: NBD_OPT_EXPORT_NAME, which has no reply header.
      sendOpt(OPT_EXPORT_NAME, exportName);
      const b = await wire.read(noZeroes ? 10 : 134);
      const s = b.readBigUInt64BE(0);
      if (s > BigInt(Number.MAX_SAFE_INTEGER)) throw bad(`the server announced an export size of ${s} bytes, past what Strata handles (2^53)`);
      size = Number(s);
      flags = b.readUInt16BE(8);
      break;
    } else if (r.type & 0x80000000) {
      const what = target.export === null ? 'the default export' : `the export '${printable(target.export)}'`;
      const said = r.data.subarray(0, MAX_STRING).toString('utf8');
      const e = r.type === 0x80000006
        ? new NotFoundError(`NBD: the server has no ${what.replace(/^the /, '')}${said ? ` (it says: ${printable(said)})` : ''}`, name).asQemu(`Requested export not available${said ? `\nserver reported: ${said}` : ''}`)
        : fail(`the server refused ${what}: ${repError(r)}`);
      wire.abort(e);
      sendOpt(OPT_ABORT, Buffer.alloc(0));
      throw e;
    } else {
      throw bad(`the server answered NBD_OPT_GO with reply type ${r.type}`);
    }
  }
  if (size === null) throw bad('the server finished the handshake without the export\'s size');
  if (minBlock > 0 && size % minBlock !== 0) throw bad(`the export size ${size} is not a multiple of the server's block size ${minBlock}`);
  // As QEMU: without an advertised block size, block status needs byte alignment, and an
  // export that is not a multiple of 512 bytes is read byte by byte too.
  if (!minBlock) minBlock = size % 512 !== 0 || contextId !== null ? 1 : 512;
  return { size, flags, minBlock, maxBlock, structured, contextId };
}
