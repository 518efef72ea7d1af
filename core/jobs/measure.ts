// measure: bytes a new image needs, computed as qemu-img measure 7.2 computes them.
import { createCipherSpec, LuksError, luksAreaLength, type LuksCreateOptions } from '../engine/luks';
import * as C from '../format/constants';
import { UsageError } from '../errors';
import { refcountMetadataSize } from '../format/layout';
import type { DiskImage } from '../engine/image';
import { Qcow2Image } from '../engine/qcow2';
import { chainBlockStatus } from '../chain/block-status';
import { throwIfCancelled, type JobContext } from './job';

export interface MeasureTarget {
  format: 'qcow2' | 'raw';
  /** compat 0.10 targets have no bitmaps. */
  version?: 2 | 3;
  clusterSize: number;
  refcountBits: number;
  extendedL2: boolean;
  /** The target will have a backing file (-o backing_file): every cluster may be needed. */
  hasBacking: boolean;
  preallocation?: 'off' | 'metadata' | 'falloc' | 'full';
  /** encrypt.format=luks: the LUKS options (its header's clusters are counted). */
  luks?: LuksCreateOptions;
}

export interface MeasureResult {
  required: number;
  'fully-allocated': number;
  bitmaps?: number;
}

const roundUp = (v: number, a: number) => Math.ceil(v / a) * a;

/** qcow2_calc_prealloc_size */
export function qcow2PreallocSize(totalSize: number, clusterSize: number, refcountOrder: number, extendedL2: boolean): number {
  const aligned = roundUp(totalSize, clusterSize);
  const l2eSize = extendedL2 ? C.L2E_SIZE_EXTENDED : C.L2E_SIZE_NORMAL;
  let meta = clusterSize;
  let nl2e = aligned / clusterSize;
  nl2e = roundUp(nl2e, clusterSize / l2eSize);
  meta += nl2e * l2eSize;
  let nl1e = (nl2e * l2eSize) / clusterSize;
  nl1e = roundUp(nl1e, clusterSize / 8);
  meta += nl1e * 8;
  meta += refcountMetadataSize((meta + aligned) / clusterSize, clusterSize, refcountOrder, false).bytes;
  return meta + aligned;
}

/** The source's bitmaps as the target will hold them (the directory was checked at open). */
function bitmapsSize(src: DiskImage, clusterSize: number): number {
  if (!(src instanceof Qcow2Image) || !src.bitmaps) return 0;
  let total = 0;
  let dirSize = 0;
  for (const e of src.bitmaps) {
    const bits = Math.ceil(src.virtualSize / 2 ** e.granularityBits);
    const bmclusters = Math.ceil(Math.ceil(bits / 8) / clusterSize);
    total += roundUp(bmclusters * 8, clusterSize) + bmclusters * clusterSize;
    dirSize = roundUp(dirSize + 24 + Buffer.byteLength(e.name), 8);
  }
  return total + roundUp(dirSize, clusterSize);
}

export async function measure(ctx: JobContext, t: MeasureTarget, src: DiskImage | null, size?: number): Promise<MeasureResult> {
  const virtualSize = src ? src.virtualSize : size ?? 0;
  if (t.format === 'raw') {
    const v = roundUp(virtualSize, 512);
    return { required: v, 'fully-allocated': v };
  }
  const cs = t.clusterSize;
  // qemu-img's qcow2_measure checks the cluster size first, then the L1 table's limit.
  if (t.extendedL2 && cs < 2 ** C.MIN_CLUSTER_BITS_EXTENDED_L2) {
    throw new UsageError(`extended_l2=on needs a cluster size of at least 16k (cluster_size is ${cs})`)
      .asQemu('Extended L2 entries are only supported with cluster sizes of at least 16384 bytes');
  }
  const aligned = roundUp(virtualSize, cs);
  const l2Entries = cs / (t.extendedL2 ? C.L2E_SIZE_EXTENDED : C.L2E_SIZE_NORMAL);
  if (Math.ceil(virtualSize / (l2Entries * cs)) > C.MAX_L1_SIZE_BYTES / 8) {
    throw new UsageError(`the image size is too large for qcow2 with ${cs}-byte clusters${t.extendedL2 ? ' and extended L2 entries' : ''} (try a larger cluster_size)`)
      .asQemu('The image size is too large (try using a larger cluster size)');
  }
  // Without a source nothing needs data clusters; with a backing file every cluster may.
  let required = src ? aligned : 0;
  if (src && !t.hasBacking) {
    required = 0;
    let off = 0;
    while (off < virtualSize) {
      throwIfCancelled(ctx);
      const st = await chainBlockStatus(src, off, virtualSize - off);
      let pnum = st.length;
      if (st.zero) {
        // zero regions need nothing (there is no backing file)
      } else if (st.data && st.present) {
        pnum = roundUp(off + pnum, cs) - off;
        required += (off % cs) + pnum;
      }
      off += pnum;
    }
  }
  if (t.preallocation === 'full' || t.preallocation === 'falloc') required = aligned;
  // qcow2_measure: a LUKS target also holds its LUKS header, in whole clusters.
  let luks = 0;
  if (t.luks) {
    try {
      luks = roundUp(luksAreaLength(createCipherSpec(t.luks).masterKeyLen), cs);
    } catch (err) {
      if (err instanceof LuksError) throw new UsageError(err.message);
      throw err;
    }
  }
  const full = qcow2PreallocSize(virtualSize, cs, Math.log2(t.refcountBits), t.extendedL2) + luks;
  const result: MeasureResult = { required: full - aligned + required, 'fully-allocated': full };
  if (src && src.format === 'qcow2' && (src as Qcow2Image).header.version === 3 && t.version !== 2) {
    return { bitmaps: bitmapsSize(src, cs), ...result };
  }
  return result;
}
