// The read-path oracle matrix, internal snapshots and backing chains: snapshots with data
// before and after, a snapshot smaller than the image, deleted snapshots; chains three deep
// with raw and qcow2 bases, backing files shorter than their overlays, committed overlays.
import { describeOracleText } from '../oracle/qemu';
import { MATRIX } from '../oracle/images';
import { describeImageMatrix } from './run-cli';

describeOracleText('read path: snapshots and backing chains QEMU wrote', () => {
  describeImageMatrix('snapshots', MATRIX.snapshots);
  describeImageMatrix('chains', MATRIX.chains);
});
