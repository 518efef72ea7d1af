// Every on-disk constant of the qcow2 format, named after the spec (reference/qcow2-spec.txt).

/** "QFI\xfb" */
export const QCOW_MAGIC = 0x514649fb;
export const QCOW_VERSION_2 = 2;
export const QCOW_VERSION_3 = 3;

/** "For version 2, the header is exactly 72 bytes in length" */
export const HEADER_V2_LENGTH = 72;
/** "For version 3 or higher, the header length is at least 104 bytes" */
export const HEADER_V3_MIN_LENGTH = 104;
/** compression_type byte at 104, padded to 112 */
export const HEADER_V3_WITH_COMPRESSION_LENGTH = 112;

/** "Must not be less than 9 (i.e. 512 byte clusters)" */
export const MIN_CLUSTER_BITS = 9;
/** "QEMU as of today has an implementation limit of 2 MB as the maximum cluster size" */
export const MAX_CLUSTER_BITS = 21;
/** "if the image has Extended L2 Entries then cluster_bits must be at least 14" */
export const MIN_CLUSTER_BITS_EXTENDED_L2 = 14;
export const DEFAULT_CLUSTER_BITS = 16;

/** "Must not be longer than 1023 bytes" */
export const MAX_BACKING_FILE_NAME = 1023;
/** "QEMU has an implementation limit of 32 MB as the maximum L1 table size" */
export const MAX_L1_SIZE_BYTES = 32 * 1024 * 1024;
/** "QEMU has an implementation limit of 8 MB as the maximum refcount table size" */
export const MAX_REFTABLE_SIZE_BYTES = 8 * 1024 * 1024;
/** "This value may not exceed 6 (i.e. refcount_bits = 64)" */
export const MAX_REFCOUNT_ORDER = 6;
export const DEFAULT_REFCOUNT_ORDER = 4;
/** QEMU's limit on the number of internal snapshots (QCOW_MAX_SNAPSHOTS) */
export const MAX_SNAPSHOTS = 65536;
/** QEMU's limit on the snapshot table size (QCOW_MAX_SNAPSHOTS_SIZE) */
export const MAX_SNAPSHOTS_SIZE = 64 * 1024 * 1024;
/** QEMU's limit on a snapshot entry's extra data (QCOW_MAX_SNAPSHOT_EXTRA_DATA) */
export const MAX_SNAPSHOT_EXTRA_DATA = 1024;

export const CRYPT_NONE = 0;
export const CRYPT_AES = 1;
export const CRYPT_LUKS = 2;

// incompatible_features
export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_DATA_FILE = 1n << 2n;
export const INCOMPAT_COMPRESSION = 1n << 3n;
export const INCOMPAT_EXTL2 = 1n << 4n;
export const INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
// compatible_features
export const COMPAT_LAZY_REFCOUNTS = 1n << 0n;
// autoclear_features
export const AUTOCLEAR_BITMAPS = 1n << 0n;
export const AUTOCLEAR_DATA_FILE_RAW = 1n << 1n;
export const AUTOCLEAR_KNOWN = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW;

export const COMPRESSION_DEFLATE = 0;
export const COMPRESSION_ZSTD = 1;

// Header extension types
export const EXT_END = 0x00000000;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_CRYPTO_HEADER = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;

/** Feature name table entry: type(1) bit(1) name(46) */
export const FEATURE_NAME_ENTRY_SIZE = 48;
export const FEATURE_TYPE_INCOMPATIBLE = 0;
export const FEATURE_TYPE_COMPATIBLE = 1;
export const FEATURE_TYPE_AUTOCLEAR = 2;

// L1/L2/refcount table entries
/** "Bits 9-55 of the offset": offset mask shared by L1, standard L2 and refcount table entries */
export const L1E_OFFSET_MASK = 0x00fffffffffffe00n;
export const L2E_OFFSET_MASK = 0x00fffffffffffe00n;
export const REFT_OFFSET_MASK = 0xfffffffffffffe00n;
/** Bit 63: "1 if its refcount is exactly one" */
export const QCOW_OFLAG_COPIED = 1n << 63n;
/** Bit 62: "1 for compressed clusters" */
export const QCOW_OFLAG_COMPRESSED = 1n << 62n;
/** Bit 0 of the standard cluster descriptor: "the cluster reads as all zeros" */
export const QCOW_OFLAG_ZERO = 1n;
/** Reserved bits that must be zero: L1 bits 0-8 and 56-62 */
export const L1E_RESERVED_MASK = 0x7f000000000001ffn;
/** Standard L2 reserved bits 1-8 and 56-61 */
export const L2E_STD_RESERVED_MASK = 0x3f000000000001fen;

export const COMPRESSED_SECTOR_SIZE = 512;

/** Extended L2: 32 subclusters per cluster; entry is 128 bits. */
export const SUBCLUSTERS_PER_CLUSTER = 32;
export const L2E_SIZE_NORMAL = 8;
export const L2E_SIZE_EXTENDED = 16;

/** Snapshot table entry fixed part */
export const SNAPSHOT_ENTRY_FIXED_SIZE = 40;
/** Version 3 images must include extra data at least up to byte 55 (16 bytes of extra) */
export const SNAPSHOT_EXTRA_DATA_V3_MIN = 16;
export const SNAPSHOT_EXTRA_DATA_SIZE = 24;

/** Bitmaps extension: at most this many bitmaps (QEMU limit) */
export const MAX_BITMAPS = 65535;
