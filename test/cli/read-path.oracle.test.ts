// The read-path oracle matrix, single images: every cluster size, extended L2, compat 0.10
// and 1.1, refcount widths, zlib and zstd, lazy refcounts, preallocation, odd sizes, resized
// images, bitmaps, raw. Each image is built by QEMU; strata must read it as qemu-img does.
import { describeOracleText } from '../oracle/qemu';
import { MATRIX } from '../oracle/images';
import { describeImageMatrix } from './run-cli';

describeOracleText('read path: single images QEMU wrote', () => {
  describeImageMatrix('matrix', MATRIX.single);
});
