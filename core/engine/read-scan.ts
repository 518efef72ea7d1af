// A copy loop's read of one window: the guest bytes into buf and, per unit, whether they hold
// a non-zero byte. With the native addon, and a chain whose window is plain file reads and
// zeros (no compressed clusters), the whole window is one request to libuv's pool, which does
// the reads and then the zero scan while the bytes are still in the CPU's cache: one hand-off
// instead of one per read, and no scan on the JavaScript thread. Otherwise img.read and
// isZero here, with the same result.
import { ioError } from '../errors';
import { native, type NativeApi, type ReadScanError } from '../io/native';
import { NodeFile, WRITE_STEP } from '../io/node-file';
import type { DiskImage, ReadSegment } from './image';
import { isZero } from './zero';

/**
 * Reads buf.length guest bytes at `offset` into buf. With a `dataUnits` array, also sets
 * dataUnits[i] to 1 when buf[i*unit, (i+1)*unit) holds a non-zero byte and 0 when it is all
 * zeros (needs unit > 0 and ceil(buf.length / unit) entries).
 */
export async function readScanned(img: DiskImage, buf: Uint8Array, offset: number, unit: number, dataUnits: Uint8Array | null): Promise<void> {
  const w = await nativeWindow(img, offset, buf.length);
  if (w) {
    await new Promise<void>((resolve, reject) => {
      w.n.readScan(buf, w.segments, dataUnits ? unit : 0, dataUnits, (err) => (err ? reject(readError(err, w.plan)) : resolve()));
    });
    return;
  }
  await img.read(buf, offset);
  if (!dataUnits) return;
  for (let i = 0, p = 0; p < buf.length; p += unit, i++) dataUnits[i] = isZero(buf, p, Math.min(buf.length, p + unit)) ? 0 : 1;
}

/**
 * readScanned, then the units holding data written to `out` at the same offsets (a raw file),
 * in the same thread-pool request: a copy without a trip through the JavaScript thread
 * between reading and writing. False, having done nothing, without the addon or when the
 * window needs more than plain reads (compressed clusters): then read and write as usual.
 * The writes bypass `out`'s write queue: they are ordered only among themselves, so nothing
 * else may write the same range of `out` meanwhile.
 */
export async function readScannedInto(img: DiskImage, buf: Uint8Array, offset: number, unit: number, dataUnits: Uint8Array, out: NodeFile): Promise<boolean> {
  const w = out.fd >= 0 ? await nativeWindow(img, offset, buf.length) : null;
  if (!w) return false;
  await new Promise<void>((resolve, reject) => {
    w.n.readScan(buf, w.segments, unit, dataUnits, (err) => {
      if (!err) resolve();
      // Not an Error (the addon could not make one): still a failure, of this window's copy.
      else if (typeof err !== 'object') reject(ioError(err, out.path, `copy of guest data at offset ${offset} failed`));
      else if (err.segment < 0) reject(ioError(err, out.path, `write of guest data at offset ${offset} failed`));
      else reject(readError(err, w.plan));
    }, out.fd, offset, WRITE_STEP);
  });
  return true;
}

/** The window's reads as the addon takes them, when it is there and they are plain file reads. */
async function nativeWindow(img: DiskImage, offset: number, length: number): Promise<{ n: NativeApi; plan: ReadSegment[]; segments: Float64Array } | null> {
  const n = native();
  const plan = n && img.readPlan ? await img.readPlan(offset, length) : null;
  const segments = plan ? nativeSegments(plan) : null;
  return n && plan && segments ? { n, plan, segments } : null;
}

/** The plan as readScan's [fd, bufOffset, fileOffset, length] quadruples; null unless every file is an open NodeFile. */
function nativeSegments(plan: ReadSegment[]): Float64Array | null {
  const out = new Float64Array(plan.length * 4);
  for (let i = 0; i < plan.length; i++) {
    const s = plan[i]!;
    let fd = -1;
    if (s.file) {
      if (!(s.file instanceof NodeFile)) return null;
      fd = s.file.fd;
      if (fd < 0) return null; // closed: let the ordinary read report it
    }
    out[i * 4] = fd;
    out[i * 4 + 1] = s.at;
    out[i * 4 + 2] = s.offset;
    out[i * 4 + 3] = s.length;
  }
  return out;
}

/** The error as NodeFile.read words it, naming the file the failed segment reads. */
function readError(err: ReadScanError, plan: ReadSegment[]): Error {
  const s = plan[err.segment];
  if (!s?.file) return err;
  return ioError(err, s.file.path, `read of ${s.length} bytes at offset ${s.offset} failed`);
}
