// QEMU's test drivers as BlockFiles (see core/chain/test-drivers.ts for the names that open
// them), for compatibility with scripts and QEMU's iotests:
//
// - BlkdebugFile, QEMU's blkdebug: the qcow2 engine reports events at the points where QEMU's
//   qcow2 driver reports them to its file (BlockFile.debugEvent: write_aio before guest data
//   is written, cluster_free before clusters are freed, ...). An [inject-error] rule for the
//   event arms its error, and the next operations on the file (read, write, flush, discard,
//   zeroing; `sector` narrows it to the one reaching that sector) fail with its errno: every
//   one after it while armed, or only the first with once. [set-state] rules move a state
//   number (1 at open) that rules with `state` wait for. The engine treats the failure as it
//   treats any failure of the file system, so what it leaves is what a real one would.
// - NullFile, QEMU's null-co: a read-only device of a given size that reads zeros.
// - QuorumFile, QEMU's quorum (read-only): copies of one file, each read voted on.
import { readFileSync } from 'node:fs';
import { constants as osConstants } from 'node:os';
import type { BlockFile, HostExtent } from './block-file';
import type { FileIdentity } from './identity';
import { FormatError, IoError, UnsupportedFeatureError, ioError, printable } from '../errors';

/** QEMU's BlkdebugEvent names (qapi/block-core.json). */
export const BLKDBG_EVENTS: ReadonlySet<string> = new Set([
  'l1_update', 'l1_grow_alloc_table', 'l1_grow_write_table', 'l1_grow_activate_table', 'l2_load', 'l2_update',
  'l2_update_compressed', 'l2_alloc_cow_read', 'l2_alloc_write', 'read_aio', 'read_backing_aio', 'read_compressed',
  'write_aio', 'write_compressed', 'vmstate_load', 'vmstate_save', 'cow_read', 'cow_write', 'reftable_load',
  'reftable_grow', 'reftable_update', 'refblock_load', 'refblock_update', 'refblock_update_part', 'refblock_alloc',
  'refblock_alloc_hookup', 'refblock_alloc_write', 'refblock_alloc_write_blocks', 'refblock_alloc_write_table',
  'refblock_alloc_switch_table', 'cluster_alloc', 'cluster_alloc_bytes', 'cluster_free', 'flush_to_os',
  'flush_to_disk', 'pwritev_rmw_head', 'pwritev_rmw_after_head', 'pwritev_rmw_tail', 'pwritev_rmw_after_tail',
  'pwritev', 'pwritev_zero', 'pwritev_done', 'empty_image_prepare', 'l1_shrink_write_table',
  'l1_shrink_free_l2_clusters', 'cor_write', 'cluster_alloc_space', 'none',
]);

/** The kinds of operation a rule can fail (QEMU's BlkdebugIOType). */
type IoType = 'read' | 'write' | 'write-zeroes' | 'discard' | 'flush' | 'block-status';
const IO_TYPES: ReadonlySet<string> = new Set(['read', 'write', 'write-zeroes', 'discard', 'flush', 'block-status']);
const DEFAULT_IO_TYPES: ReadonlySet<IoType> = new Set(['read', 'write', 'write-zeroes', 'discard', 'flush']);

export interface InjectRule {
  action: 'inject';
  event: string;
  state: number;
  errno: number;
  once: boolean;
  immediately: boolean;
  /** Byte offset the failing request must reach, or -1 for any. */
  offset: number;
  iotypes: ReadonlySet<IoType>;
}

export interface SetStateRule {
  action: 'set-state';
  event: string;
  state: number;
  newState: number;
}

export type BlkdebugRule = InjectRule | SetStateRule;

const OPTIONS: Record<string, ReadonlySet<string>> = {
  'inject-error': new Set(['event', 'state', 'iotype', 'errno', 'sector', 'once', 'immediately']),
  'set-state': new Set(['event', 'state', 'new_state']),
};

/** strerror's text for an errno code, as QEMU prints it. */
const STRERROR: Record<string, string> = {
  EPERM: 'Operation not permitted', ENOENT: 'No such file or directory', EIO: 'Input/output error',
  ENXIO: 'No such device or address', E2BIG: 'Argument list too long', EBADF: 'Bad file descriptor',
  EAGAIN: 'Resource temporarily unavailable', ENOMEM: 'Cannot allocate memory', EACCES: 'Permission denied',
  EFAULT: 'Bad address', EBUSY: 'Device or resource busy', EEXIST: 'File exists', ENODEV: 'No such device',
  ENOTDIR: 'Not a directory', EISDIR: 'Is a directory', EINVAL: 'Invalid argument', EFBIG: 'File too large',
  ENOSPC: 'No space left on device', ESPIPE: 'Illegal seek', EROFS: 'Read-only file system', EDOM: 'Numerical argument out of domain',
  ERANGE: 'Numerical result out of range', ENOTSUP: 'Operation not supported', EOPNOTSUPP: 'Operation not supported',
  ETIMEDOUT: 'Connection timed out', ECANCELED: 'Operation canceled', EDQUOT: 'Disk quota exceeded',
};

/** The error code name of an errno number (5 → EIO). */
export function errnoName(n: number): string | undefined {
  for (const [k, v] of Object.entries(osConstants.errno)) if (v === n) return k;
  return undefined;
}

/**
 * The strerror text of an I/O error (an IoError's code, or a system error's), as QEMU words
 * it: "Input/output error" when the error carries no code.
 */
export function errorText(err: unknown): string {
  const code = (err as { code?: unknown })?.code;
  if (typeof code === 'string' && STRERROR[code]) return STRERROR[code]!;
  if (typeof code === 'string' && (err instanceof Error)) return err.message;
  return 'Input/output error';
}

function parseNumber(v: unknown, key: string, where: string): number {
  const n = typeof v === 'number' ? v : typeof v === 'string' && /^\s*(0x[0-9a-f]+|\d+)\s*$/i.test(v) ? Number(v) : NaN;
  if (!Number.isSafeInteger(n) || n < 0) throw new FormatError(`${where}: '${key}' must be a number, not '${printable(String(v))}'`);
  return n;
}

function parseBool(v: unknown, key: string, where: string): boolean {
  if (typeof v === 'boolean') return v;
  if (typeof v === 'string') {
    if (['on', 'yes', 'true', 'y'].includes(v)) return true;
    if (['off', 'no', 'false', 'n'].includes(v)) return false;
  }
  throw new FormatError(`${where}: '${key}' must be on or off, not '${printable(String(v))}'`);
}

/** One rule from its options (a config file's section, or a json: object). */
export function blkdebugRule(group: string, o: Record<string, unknown>, where: string): BlkdebugRule {
  const allowed = OPTIONS[group];
  if (!allowed) throw new FormatError(`${where}: there is no section [${printable(group)}] (blkdebug has [inject-error] and [set-state])`);
  for (const k of Object.keys(o)) if (!allowed.has(k)) throw new FormatError(`${where}: [${group}] has no option '${printable(k)}' (it has ${[...allowed].join(', ')})`);
  const event = o.event;
  if (event === undefined) throw new FormatError(`${where}: [${group}] needs an event`);
  if (typeof event !== 'string' || !BLKDBG_EVENTS.has(event)) throw new FormatError(`${where}: '${printable(String(event))}' is not a blkdebug event (read_aio, write_aio, l1_update, cluster_free, ...)`);
  const state = o.state === undefined ? 0 : parseNumber(o.state, 'state', where);
  if (group === 'set-state') {
    return { action: 'set-state', event, state, newState: o.new_state === undefined ? 0 : parseNumber(o.new_state, 'new_state', where) };
  }
  let iotypes = DEFAULT_IO_TYPES;
  if (o.iotype !== undefined) {
    if (typeof o.iotype !== 'string' || !IO_TYPES.has(o.iotype)) throw new FormatError(`${where}: 'iotype' must be one of ${[...IO_TYPES].join(', ')}`);
    iotypes = new Set([o.iotype as IoType]);
  }
  const errno = o.errno === undefined ? 5 : parseNumber(o.errno, 'errno', where);
  const sector = o.sector === undefined ? -1 : parseNumber(o.sector, 'sector', where);
  return {
    action: 'inject', event, state, errno,
    once: o.once === undefined ? false : parseBool(o.once, 'once', where),
    immediately: o.immediately === undefined ? false : parseBool(o.immediately, 'immediately', where),
    offset: sector < 0 ? -1 : sector * 512,
    iotypes,
  };
}

/**
 * A blkdebug config file in QEMU's ini syntax (qemu_config_parse): `[inject-error]` and
 * `[set-state]` sections of `key = "value"` lines; `#` starts a comment line.
 */
export function parseBlkdebugConfig(text: string, file: string): BlkdebugRule[] {
  const rules: BlkdebugRule[] = [];
  let group: string | null = null;
  let opts: Record<string, unknown> = {};
  let start = 0;
  const end = () => { if (group !== null) rules.push(blkdebugRule(group, opts, `${printable(file)}:${start}`)); };
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i]!.trim();
    if (line === '' || line.startsWith('#')) continue;
    const where = `${printable(file)}:${i + 1}`;
    const sec = /^\[([^\]\s"]+)(?:\s+"[^"]*")?\]$/.exec(line);
    if (sec) {
      end();
      group = sec[1]!;
      opts = {};
      start = i + 1;
      if (!OPTIONS[group]) throw new FormatError(`${where}: there is no section [${printable(group)}] (blkdebug has [inject-error] and [set-state])`);
      continue;
    }
    const kv = /^(\S+)\s+=\s*"([^"]*)"/.exec(line);
    if (!kv || kv[1]!.includes('=')) throw new FormatError(`${where}: parse error (expected [section] or key = "value")`);
    if (group === null) throw new FormatError(`${where}: no group defined (a [inject-error] or [set-state] line comes first)`);
    opts[kv[1]!] = kv[2]!;
  }
  end();
  return rules;
}

/** The rules a blkdebug node is given: its config file's, then its options' (as QEMU reads them). */
export function blkdebugRules(spec: { config?: string; injectError?: unknown[]; setState?: unknown[] }, image: string): BlkdebugRule[] {
  const rules: BlkdebugRule[] = [];
  if (spec.config !== undefined) {
    let text: string;
    try {
      text = readFileSync(spec.config, 'utf8');
    } catch (err) {
      throw new FormatError(`cannot read the blkdebug config file '${printable(spec.config)}': ${errorText(err)}`, image)
        .asQemu(`Could not read blkdebug config file: ${errorText(err)}`);
    }
    rules.push(...parseBlkdebugConfig(text, spec.config));
  }
  const fromOptions = (list: unknown[] | undefined, group: string) => {
    (list ?? []).forEach((r, i) => {
      if (r === null || typeof r !== 'object' || Array.isArray(r)) throw new FormatError(`blkdebug's ${group}[${i}] must be an object`, image);
      rules.push(blkdebugRule(group, r as Record<string, unknown>, `${printable(image)}: ${group}[${i}]`));
    });
  };
  fromOptions(spec.injectError, 'inject-error');
  fromOptions(spec.setState, 'set-state');
  return rules;
}

/** A file behind QEMU's blkdebug filter (see the head of this file). */
export class BlkdebugFile implements BlockFile {
  readonly extents?: (offset: number, length: number) => Promise<HostExtent[]>;
  readonly allocatedSize?: () => Promise<number>;
  readonly discard?: (offset: number, length: number) => Promise<void>;
  readonly zeroRange?: (offset: number, length: number) => Promise<boolean>;
  readonly identity?: () => Promise<FileIdentity>;
  private state = 1;
  /** Armed rules, the last armed first (QEMU's active_rules). */
  private active: InjectRule[] = [];
  private readonly rules: BlkdebugRule[];
  /** The failures injected, in order (for tests). */
  readonly injected: string[] = [];

  constructor(private readonly inner: BlockFile, rules: BlkdebugRule[]) {
    // QEMU adds each rule at the head of its event's list.
    this.rules = [...rules].reverse();
    if (inner.extents) this.extents = (o, l) => inner.extents!(o, l);
    if (inner.allocatedSize) this.allocatedSize = () => inner.allocatedSize!();
    if (inner.identity) this.identity = () => inner.identity!();
    if (inner.discard) this.discard = async (o, l) => { this.check('discard', o, l, 'fallocate'); return inner.discard!(o, l); };
    if (inner.zeroRange) this.zeroRange = async (o, l) => { this.check('write-zeroes', o, l, 'fallocate'); return inner.zeroRange!(o, l); };
  }

  get path(): string { return this.inner.path; }
  get writable(): boolean { return this.inner.writable; }
  size(): Promise<number> { return this.inner.size(); }

  debugEvent(event: string): void {
    let newState = this.state;
    let injected = 0;
    for (const r of this.rules) {
      if (r.event !== event || (r.state && r.state !== this.state)) continue;
      if (r.action === 'set-state') { newState = r.newState; continue; }
      if (++injected === 1) this.active = [];
      this.active.unshift(r);
    }
    this.state = newState;
  }

  /** Fails the operation when an armed rule covers it (QEMU's rule_check). */
  private check(type: IoType, offset: number, length: number, syscall: string): void {
    const rule = this.active.find((r) => (r.offset === -1 || (length > 0 && r.offset >= offset && r.offset < offset + length)) && r.iotypes.has(type));
    if (!rule || !rule.errno) return;
    if (rule.once) {
      this.active = this.active.filter((r) => r !== rule);
      const i = this.rules.indexOf(rule);
      if (i >= 0) this.rules.splice(i, 1);
    }
    const code = errnoName(rule.errno) ?? 'EIO';
    const what = type === 'flush' ? 'flush failed' : `${type} of ${length} bytes at offset ${offset} failed`;
    this.injected.push(`${type} ${offset}+${length}: ${code}`);
    const sys = Object.assign(new Error(`${code}: ${STRERROR[code] ?? 'error'} (injected by blkdebug), ${syscall}`), { code, syscall });
    throw ioError(sys, this.path, what);
  }

  async read(buf: Uint8Array, offset: number): Promise<number> {
    this.check('read', offset, buf.length, 'read');
    return this.inner.read(buf, offset);
  }

  async write(buf: Uint8Array, offset: number): Promise<void> {
    this.check('write', offset, buf.length, 'write');
    return this.inner.write(buf, offset);
  }

  truncate(size: number): Promise<void> { return this.inner.truncate(size); }

  async flush(): Promise<void> {
    this.check('flush', 0, 0, 'fsync');
    return this.inner.flush();
  }

  close(): Promise<void> { return this.inner.close(); }
}

/** QEMU's null-co: `length` bytes that read as zeros; nothing can be written. */
export class NullFile implements BlockFile {
  readonly writable = false;
  constructor(readonly path: string, private readonly length: number) {}
  async size(): Promise<number> { return this.length; }
  async read(buf: Uint8Array): Promise<number> { buf.fill(0); return buf.length; }
  async write(): Promise<void> { throw new IoError('the null-co driver is read-only in Strata', this.path, 'EROFS'); }
  async truncate(): Promise<void> { throw new IoError('the null-co driver is read-only in Strata', this.path, 'EROFS'); }
  async flush(): Promise<void> {}
  async close(): Promise<void> {}
  /** All of it reads as zeros: QEMU's null-co with read-zeroes reports it as zero. */
  async extents(offset: number, length: number): Promise<HostExtent[]> { return [{ offset, length, data: false }]; }
}

/**
 * QEMU's quorum, read-only: each read goes to every copy and returns what at least
 * `threshold` of them agree on; fewer agreeing is an I/O error.
 */
export class QuorumFile implements BlockFile {
  readonly writable = false;
  constructor(private readonly children: BlockFile[], private readonly threshold: number) {}
  get path(): string { return this.children[0]!.path; }
  size(): Promise<number> { return this.children[0]!.size(); }
  async read(buf: Uint8Array, offset: number): Promise<number> {
    const copies = await Promise.all(this.children.map(async (c) => {
      const b = Buffer.alloc(buf.length);
      return { b, n: await c.read(b, offset) };
    }));
    let best = copies[0]!;
    let votes = 0;
    for (const c of copies) {
      const v = copies.filter((d) => d.b.equals(c.b)).length;
      if (v > votes) { best = c; votes = v; }
    }
    if (votes < this.threshold) {
      throw new IoError(`read of ${buf.length} bytes at offset ${offset}: the quorum's copies disagree (${votes} of ${this.children.length} agree, ${this.threshold} needed)`, this.path, 'EIO');
    }
    buf.set(best.b);
    return best.n;
  }
  async write(): Promise<void> { throw new UnsupportedFeatureError('Strata opens a quorum for reading only', this.path); }
  async truncate(): Promise<void> { throw new UnsupportedFeatureError('Strata opens a quorum for reading only', this.path); }
  async flush(): Promise<void> {}
  async close(): Promise<void> { await Promise.all(this.children.map((c) => c.close())); }
}
