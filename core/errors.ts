// Typed errors per domain. Each carries what a person needs to act: the file and the problem.
// The CLI prints `message` on one line; the stack only with STRATA_DEBUG=1.

export type ErrorKind = 'format' | 'corrupt' | 'unsupported' | 'in-use' | 'io' | 'usage' | 'cancelled' | 'not-found';

export class StrataError extends Error {
  readonly kind: ErrorKind;
  readonly file: string | undefined;
  /**
   * qemu-img's own text for this error (without its "qemu-img: " prefix), when it has one and
   * it differs: what the CLI prints when it runs as the qemu-img drop-in.
   */
  qemu: string | undefined;
  constructor(kind: ErrorKind, message: string, file?: string, options?: { cause?: unknown }) {
    super(file ? `${file}: ${message}` : message, options);
    this.name = 'StrataError';
    this.kind = kind;
    this.file = file;
  }

  /** Sets qemu-img's text for this error (see `qemu`); returns the error for `throw`. */
  asQemu(text: string): this {
    this.qemu = text;
    return this;
  }
}

/** Not a valid image of the expected format (bad magic, bad field values). */
export class FormatError extends StrataError {
  constructor(message: string, file?: string) { super('format', message, file); this.name = 'FormatError'; }
}

/** Metadata that contradicts itself or points where it must not. */
export class CorruptImageError extends StrataError {
  constructor(message: string, file?: string) { super('corrupt', message, file); this.name = 'CorruptImageError'; }
}

/**
 * A refcount would pass what the image's refcount width holds (a snapshot of an image with
 * 1-bit refcounts, a fourth reference with 2 bits): refused before anything is written.
 */
export class RefcountOverflowError extends CorruptImageError {
  constructor(message: string, file?: string) { super(message, file); this.name = 'RefcountOverflowError'; }
}

/**
 * A snapshot table entry whose L1 table cannot be used: its offset is not cluster-aligned, or
 * it is larger than any L1 table may be. Strata refuses the image at open; qemu-img opens it
 * and fails only where it loads that snapshot's table, each command in its own words.
 */
export class SnapshotL1Error extends CorruptImageError {
  constructor(message: string, file: string | undefined, readonly snapshot: { id: string; name: string }, readonly problem: 'offset' | 'size') {
    super(message, file);
    this.name = 'SnapshotL1Error';
  }

  /** Whether `idOrName` (as a command names a snapshot) is this entry. */
  names(idOrName: string): boolean {
    const bare = idOrName.replace(/^snapshot\.(?:name|id)=/, '');
    return bare === this.snapshot.id || bare === this.snapshot.name;
  }

  /** QEMU's words for the problem ("Snapshot L1 table offset invalid") and its errno text. */
  get qemuWords(): { what: string; errno: string } {
    return this.problem === 'offset'
      ? { what: 'Snapshot L1 table offset invalid', errno: 'Invalid argument' }
      : { what: 'Snapshot L1 table too large', errno: 'File too large' };
  }
}

/** A valid image using a feature we do not implement (encryption, unknown incompatible bits). */
export class UnsupportedFeatureError extends StrataError {
  constructor(message: string, file?: string) { super('unsupported', message, file); this.name = 'UnsupportedFeatureError'; }
}

/** Another process holds a conflicting lock on the image. */
export class InUseError extends StrataError {
  constructor(message: string, file?: string) { super('in-use', message, file); this.name = 'InUseError'; }
}

/**
 * A job would write a file it reads: its target is one of its source images (the same file
 * through any name). Refused before anything is written.
 */
export class SameFileError extends StrataError {
  constructor(message: string, file?: string) { super('in-use', message, file); this.name = 'SameFileError'; }
}

export class IoError extends StrataError {
  readonly code: string | undefined;
  constructor(message: string, file?: string, code?: string, cause?: unknown) {
    super('io', message, file, { cause });
    this.name = 'IoError';
    this.code = code;
  }
}

export class NotFoundError extends StrataError {
  constructor(message: string, file?: string) { super('not-found', message, file); this.name = 'NotFoundError'; }
}

export class UsageError extends StrataError {
  constructor(message: string) { super('usage', message); this.name = 'UsageError'; }
}

export class CancelledError extends StrataError {
  constructor(message = 'cancelled') { super('cancelled', message); this.name = 'CancelledError'; }
}

/** Turns a Node system error into an IoError naming the file and what went wrong. */
export function ioError(err: unknown, file: string, what: string): StrataError {
  if (err instanceof StrataError) return err;
  const e = err as NodeJS.ErrnoException;
  const code = e?.code;
  switch (code) {
    case 'ENOENT': {
      const nf = new NotFoundError(`${what}: no such file`, file);
      // qemu-img names the file twice: the format layer's open around the protocol layer's.
      return what === 'cannot open' ? nf.asQemu(`Could not open '${file}': Could not open '${file}': No such file or directory`) : nf;
    }
    case 'EACCES': case 'EPERM': return new IoError(`${what}: permission denied`, file, code, err);
    case 'EROFS': return new IoError(`${what}: read-only file system`, file, code, err);
    case 'ENOSPC': return new IoError(`${what}: no space left on the file system`, file, code, err);
    case 'EISDIR': return new IoError(`${what}: is a directory`, file, code, err);
    default: return new IoError(`${what}: ${e?.message ?? String(err)}`, file, code, err);
  }
}

/** A name taken from an image, safe to put in a one-line message (control bytes escaped). */
export function printable(name: string): string {
  // eslint-disable-next-line no-control-regex
  return name.replace(/[\x00-\x1f\x7f]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`);
}
