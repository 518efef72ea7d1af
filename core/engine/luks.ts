// LUKS1 encryption inside qcow2 (crypt_method 2): the LUKS header and its key material live in
// clusters the full disk encryption header extension points to; the guest data is encrypted
// per 512-byte sector with the master key, the IV generated from the sector's number. qcow2
// numbers LUKS sectors by host offset (QEMU's crypt_physical_offset), not guest offset.
//
// Unlocking: each active key slot's key is PBKDF2(password, slot salt), which decrypts the slot's
// anti-forensic split key material; merged, it is a candidate master key, accepted when its
// PBKDF2 digest matches the header's.
import { crypto } from '../codec/builtins';

export const LUKS_SECTOR = 512;
export const LUKS_MAGIC = Buffer.from([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]);
const NUM_SLOTS = 8;
const SLOT_ENABLED = 0x00ac71f3;
const SLOT_DISABLED = 0x0000dead;
const STRIPES = 4000;
const DIGEST_LEN = 20;
const SALT_LEN = 32;
export const LUKS_HEADER_LEN = 592;
const HEADER_LEN = LUKS_HEADER_LEN;
/** Key material starts after the first 4 KiB (cryptsetup's alignment, which QEMU follows). */
const KEY_SLOT_OFFSET = 4096;
const MIN_ITERS = 1000;

export interface LuksSlot {
  active: boolean;
  iterations: number;
  salt: Buffer;
  keyOffsetSector: number;
  stripes: number;
}

export interface LuksHeader {
  version: number;
  cipherName: string;
  cipherMode: string;
  hashSpec: string;
  payloadOffsetSector: number;
  masterKeyLen: number;
  masterKeyDigest: Buffer;
  masterKeySalt: Buffer;
  masterKeyIterations: number;
  uuid: string;
  slots: LuksSlot[];
}

/** The parameters of a cipher as named by a LUKS header: algorithm, mode and IV generator. */
export interface LuksCipherSpec {
  /** 'aes-128', 'aes-192', 'aes-256' (the data key's size: half the master key with xts). */
  alg: string;
  mode: 'xts' | 'cbc' | 'ecb';
  ivgen: 'plain' | 'plain64' | 'essiv';
  /** The hash of the essiv IV generator. */
  ivgenHash?: string;
  /** The key-derivation hash (PBKDF2 and the anti-forensic diffusion). */
  hash: string;
}

/** A refusal of a LUKS header or its parameters; the caller names the file. */
export class LuksError extends Error {}

function cString(buf: Buffer, start: number, len: number): string {
  const b = buf.subarray(start, start + len);
  const nul = b.indexOf(0);
  return b.subarray(0, nul < 0 ? b.length : nul).toString('latin1');
}

export function decodeLuksHeader(buf: Buffer): LuksHeader {
  if (buf.length < HEADER_LEN || !buf.subarray(0, 6).equals(LUKS_MAGIC)) throw new LuksError('Volume is not in LUKS format');
  const version = buf.readUInt16BE(6);
  if (version !== 1) throw new LuksError(`LUKS version ${version} is not supported`);
  const slots: LuksSlot[] = [];
  for (let i = 0; i < NUM_SLOTS; i++) {
    const p = 208 + i * 48;
    const active = buf.readUInt32BE(p);
    slots.push({ active: active === SLOT_ENABLED, iterations: buf.readUInt32BE(p + 4), salt: Buffer.from(buf.subarray(p + 8, p + 40)), keyOffsetSector: buf.readUInt32BE(p + 40), stripes: buf.readUInt32BE(p + 44) });
  }
  return {
    version,
    cipherName: cString(buf, 8, 32), cipherMode: cString(buf, 40, 32), hashSpec: cString(buf, 72, 32),
    payloadOffsetSector: buf.readUInt32BE(104), masterKeyLen: buf.readUInt32BE(108),
    masterKeyDigest: Buffer.from(buf.subarray(112, 132)), masterKeySalt: Buffer.from(buf.subarray(132, 164)),
    masterKeyIterations: buf.readUInt32BE(164), uuid: cString(buf, 168, 40), slots,
  };
}

export function encodeLuksHeader(h: LuksHeader): Buffer {
  const b = Buffer.alloc(HEADER_LEN);
  LUKS_MAGIC.copy(b, 0);
  b.writeUInt16BE(h.version, 6);
  b.write(h.cipherName, 8, 31, 'latin1');
  b.write(h.cipherMode, 40, 31, 'latin1');
  b.write(h.hashSpec, 72, 31, 'latin1');
  b.writeUInt32BE(h.payloadOffsetSector, 104);
  b.writeUInt32BE(h.masterKeyLen, 108);
  h.masterKeyDigest.copy(b, 112);
  h.masterKeySalt.copy(b, 132);
  b.writeUInt32BE(h.masterKeyIterations, 164);
  b.write(h.uuid, 168, 39, 'latin1');
  h.slots.forEach((s, i) => {
    const p = 208 + i * 48;
    b.writeUInt32BE(s.active ? SLOT_ENABLED : SLOT_DISABLED, p);
    b.writeUInt32BE(s.iterations, p + 4);
    s.salt.copy(b, p + 8);
    b.writeUInt32BE(s.keyOffsetSector, p + 40);
    b.writeUInt32BE(s.stripes, p + 44);
  });
  return b;
}

const HASHES = ['md5', 'sha1', 'sha224', 'sha256', 'sha384', 'sha512', 'ripemd160'];

function checkHash(name: string): string {
  if (!HASHES.includes(name) || !crypto().getHashes().includes(name)) throw new LuksError(`Unsupported hash algorithm '${name}'`);
  return name;
}

/** The cipher a header names ("aes" with "xts-plain64" and a 64-byte key: aes-256 XTS). */
export function headerCipherSpec(h: LuksHeader): LuksCipherSpec {
  const m = /^([a-z0-9]+)-([a-z0-9]+)(?::([a-z0-9]+))?$/.exec(h.cipherMode);
  if (!m) throw new LuksError(`Unsupported cipher mode spec '${h.cipherMode}'`);
  const [, mode, ivgen, ivgenHash] = m;
  if (mode !== 'xts' && mode !== 'cbc' && mode !== 'ecb') throw new LuksError(`Unsupported cipher mode '${mode}'`);
  if (ivgen !== 'plain' && ivgen !== 'plain64' && ivgen !== 'essiv') throw new LuksError(`Unsupported IV generator '${ivgen}'`);
  if (ivgen === 'essiv' && !ivgenHash) throw new LuksError('Missing IV generator hash specification');
  const keyLen = mode === 'xts' ? h.masterKeyLen / 2 : h.masterKeyLen;
  if (h.cipherName !== 'aes' || ![16, 24, 32].includes(keyLen) || (mode === 'xts' && keyLen === 24)) {
    throw new LuksError(`Unsupported cipher '${h.cipherName}' with key size ${h.masterKeyLen}`);
  }
  return { alg: `aes-${keyLen * 8}`, mode, ivgen, ...(ivgenHash ? { ivgenHash: checkHash(ivgenHash) } : {}), hash: checkHash(h.hashSpec) };
}

/** Encrypts or decrypts whole 512-byte sectors with one key, IVs from the sector numbers. */
class SectorCrypt {
  private readonly nodeAlg: string;
  private readonly essivKey: Buffer | null;

  constructor(private readonly spec: LuksCipherSpec, private readonly key: Buffer) {
    this.nodeAlg = `${spec.alg}-${spec.mode}`;
    this.essivKey = spec.ivgen === 'essiv' ? crypto().createHash(spec.ivgenHash!).update(key).digest() : null;
    if (this.essivKey && ![16, 24, 32].includes(this.essivKey.length)) throw new LuksError(`Unsupported essiv hash '${spec.ivgenHash}'`);
  }

  private iv(sector: bigint): Buffer | null {
    if (this.spec.mode === 'ecb') return null;
    const iv = Buffer.alloc(16);
    if (this.spec.ivgen === 'plain') iv.writeUInt32LE(Number(sector & 0xffff_ffffn), 0);
    else iv.writeBigUInt64LE(sector & 0xffff_ffff_ffff_ffffn, 0);
    if (this.essivKey) {
      const c = crypto().createCipheriv(`aes-${this.essivKey.length * 8}-ecb`, this.essivKey, null);
      c.setAutoPadding(false);
      return c.update(iv);
    }
    return iv;
  }

  run(buf: Uint8Array, firstSector: bigint, encrypt: boolean): void {
    if (buf.length % LUKS_SECTOR !== 0) throw new RangeError(`LUKS sectors must be whole: ${buf.length} bytes`);
    let sector = firstSector;
    for (let p = 0; p < buf.length; p += LUKS_SECTOR, sector++) {
      const c = encrypt ? crypto().createCipheriv(this.nodeAlg, this.key, this.iv(sector)) : crypto().createDecipheriv(this.nodeAlg, this.key, this.iv(sector));
      c.setAutoPadding(false);
      const piece = buf.subarray(p, p + LUKS_SECTOR);
      const out = c.update(piece);
      c.final();
      piece.set(out);
    }
  }
}

/** The data cipher of an unlocked LUKS image: sectors numbered by host offset. */
export class LuksCipher {
  /** The IV comes from the host (file) offset, not the guest offset. */
  readonly physical = true;
  private readonly crypt: SectorCrypt;

  constructor(spec: LuksCipherSpec, masterKey: Buffer) {
    this.crypt = new SectorCrypt(spec, masterKey);
  }

  encrypt(buf: Uint8Array, offset: number): void {
    checkWhole(buf, offset);
    this.crypt.run(buf, BigInt(offset / LUKS_SECTOR), true);
  }

  decrypt(buf: Uint8Array, offset: number): void {
    checkWhole(buf, offset);
    this.crypt.run(buf, BigInt(offset / LUKS_SECTOR), false);
  }
}

function checkWhole(buf: Uint8Array, offset: number): void {
  if (offset % LUKS_SECTOR !== 0 || buf.length % LUKS_SECTOR !== 0) {
    throw new RangeError(`LUKS sectors must be whole: ${buf.length} bytes at offset ${offset}`);
  }
}

// ---- anti-forensic split (cryptsetup's AF, as QEMU's afsplit.c) ----

/** Diffuses `block` in place: each digest-sized piece replaced by hash(be32 index ‖ piece). */
function afHash(hash: string, block: Buffer): void {
  const digestLen = crypto().createHash(hash).digest().length;
  for (let i = 0, p = 0; p < block.length; i++, p += digestLen) {
    const n = Math.min(digestLen, block.length - p);
    const iv = Buffer.alloc(4);
    iv.writeUInt32BE(i, 0);
    const out = crypto().createHash(hash).update(iv).update(block.subarray(p, p + n)).digest();
    out.copy(block, p, 0, n);
  }
}

function xorInto(dst: Buffer, a: Buffer, b: Buffer): void {
  for (let i = 0; i < dst.length; i++) dst[i] = a[i]! ^ b[i]!;
}

export function afSplit(hash: string, key: Buffer, stripes: number): Buffer {
  const n = key.length;
  const out = crypto().randomBytes(n * stripes);
  const block = Buffer.alloc(n);
  for (let i = 0; i < stripes - 1; i++) {
    xorInto(block, block, out.subarray(i * n, (i + 1) * n));
    afHash(hash, block);
  }
  xorInto(out.subarray((stripes - 1) * n), key, block);
  return out;
}

export function afMerge(hash: string, material: Buffer, keyLen: number, stripes: number): Buffer {
  const block = Buffer.alloc(keyLen);
  for (let i = 0; i < stripes - 1; i++) {
    xorInto(block, block, material.subarray(i * keyLen, (i + 1) * keyLen));
    afHash(hash, block);
  }
  const key = Buffer.alloc(keyLen);
  xorInto(key, material.subarray((stripes - 1) * keyLen, stripes * keyLen), block);
  return key;
}

// ---- unlocking ----

/** The bytes of key material a slot holds, rounded up to whole sectors. */
function materialLength(keyLen: number, stripes: number): number {
  return Math.ceil((keyLen * stripes) / LUKS_SECTOR) * LUKS_SECTOR;
}

/**
 * Tries the password on one slot: the master key it unlocks, or null (wrong password).
 * `read(offset, length)` reads from the LUKS header area.
 */
async function trySlot(h: LuksHeader, spec: LuksCipherSpec, slot: LuksSlot, password: Buffer,
  read: (offset: number, length: number) => Promise<Buffer>): Promise<Buffer | null> {
  const slotKey = crypto().pbkdf2Sync(password, slot.salt, slot.iterations, h.masterKeyLen, spec.hash);
  const material = await read(slot.keyOffsetSector * LUKS_SECTOR, materialLength(h.masterKeyLen, slot.stripes));
  new SectorCrypt(spec, slotKey).run(material, 0n, false);
  const key = afMerge(spec.hash, material, h.masterKeyLen, slot.stripes);
  const digest = crypto().pbkdf2Sync(key, h.masterKeySalt, h.masterKeyIterations, DIGEST_LEN, spec.hash);
  return crypto().timingSafeEqual(digest, h.masterKeyDigest) ? key : null;
}

/** The master key the password unlocks (the first slot that takes it), or null. */
export async function unlockLuks(h: LuksHeader, password: Buffer,
  read: (offset: number, length: number) => Promise<Buffer>): Promise<{ key: Buffer; slot: number } | null> {
  const spec = headerCipherSpec(h);
  for (let i = 0; i < NUM_SLOTS; i++) {
    const s = h.slots[i]!;
    if (!s.active) continue;
    if (s.stripes < 1 || s.stripes > 100000 || s.iterations === 0) throw new LuksError(`Keyslot ${i} is corrupted`);
    const key = await trySlot(h, spec, s, password, read);
    if (key) return { key, slot: i };
  }
  return null;
}

// ---- creating ----

export interface LuksCreateOptions {
  cipherAlg?: string;
  cipherMode?: string;
  ivgenAlg?: string;
  ivgenHashAlg?: string;
  hashAlg?: string;
  /** Milliseconds of PBKDF2 per unlock (QEMU's default 2000). */
  iterTime?: number;
}

/** PBKDF2 iterations per second for `hash` over a password of `len` bytes (QEMU's count_iters, shorter). */
function pbkdf2Rate(hash: string, len: number): number {
  const pw = crypto().randomBytes(len);
  const salt = crypto().randomBytes(SALT_LEN);
  let iters = 1 << 12;
  for (;;) {
    const t = process.hrtime.bigint();
    crypto().pbkdf2Sync(pw, salt, iters, DIGEST_LEN, hash);
    const ms = Number(process.hrtime.bigint() - t) / 1e6;
    if (ms >= 50 || iters >= 1 << 24) return Math.floor((iters * 1000) / Math.max(ms, 1e-3));
    iters *= 2;
  }
}

/** QEMU's option values → the header's cipher spec; throws LuksError for what is not supported. */
export function createCipherSpec(o: LuksCreateOptions): LuksCipherSpec & { masterKeyLen: number; cipherMode: string } {
  const alg = o.cipherAlg ?? 'aes-256';
  const mode = o.cipherMode ?? 'xts';
  const ivgen = o.ivgenAlg ?? 'plain64';
  const hash = o.hashAlg ?? 'sha256';
  const m = /^aes-(128|192|256)$/.exec(alg);
  if (!m) throw new LuksError(`Cipher algorithm '${alg}' is not supported (aes-128, aes-256)`);
  if (mode !== 'xts' && mode !== 'cbc' && mode !== 'ecb') throw new LuksError(`Cipher mode '${mode}' is not supported (xts, cbc, ecb)`);
  // 24-byte keys split into 4000 stripes are not whole sectors: QEMU 7.2 aborts on them.
  if (alg === 'aes-192') throw new LuksError('Cipher aes-192 is not supported for LUKS (its key material is not whole sectors; use aes-128 or aes-256)');
  if (ivgen !== 'plain' && ivgen !== 'plain64' && ivgen !== 'essiv') throw new LuksError(`IV generator '${ivgen}' is not supported (plain, plain64, essiv)`);
  checkHash(hash);
  const ivgenHash = ivgen === 'essiv' ? checkHash(o.ivgenHashAlg ?? 'sha256') : undefined;
  const keyLen = Number(m[1]) / 8;
  return {
    alg, mode, ivgen, hash, ...(ivgenHash ? { ivgenHash } : {}),
    masterKeyLen: mode === 'xts' ? keyLen * 2 : keyLen,
    cipherMode: o.ivgenHashAlg !== undefined ? `${mode}-${ivgen}:${o.ivgenHashAlg}` : `${mode}-${ivgen}`,
  };
}

/** The sectors one slot's material takes, aligned as QEMU aligns it (to the 4 KiB header). */
function slotSectors(keyLen: number, stripes: number): number {
  const hs = KEY_SLOT_OFFSET / LUKS_SECTOR;
  return Math.ceil(Math.ceil((keyLen * stripes) / LUKS_SECTOR) / hs) * hs;
}

/** The LUKS area's length (QEMU's payload offset) for a master key of `keyLen` bytes. */
export function luksAreaLength(keyLen: number): number {
  return (KEY_SLOT_OFFSET / LUKS_SECTOR + NUM_SLOTS * slotSectors(keyLen, STRIPES)) * LUKS_SECTOR;
}

/** Stores `masterKey` under `password` in slot `i` of `h` (its material into `area`). */
export function storeKey(h: LuksHeader, area: Buffer, i: number, password: Buffer, masterKey: Buffer, iterTime: number): void {
  const spec = headerCipherSpec(h);
  const slot = h.slots[i]!;
  const rate = pbkdf2Rate(spec.hash, password.length);
  slot.iterations = Math.max(MIN_ITERS, Math.min(0xffff_ffff, Math.floor((rate * iterTime) / 1000)));
  slot.salt = crypto().randomBytes(SALT_LEN);
  const slotKey = crypto().pbkdf2Sync(password, slot.salt, slot.iterations, h.masterKeyLen, spec.hash);
  const split = afSplit(spec.hash, masterKey, slot.stripes);
  const material = Buffer.alloc(materialLength(h.masterKeyLen, slot.stripes));
  split.copy(material);
  new SectorCrypt(spec, slotKey).run(material, 0n, true);
  material.copy(area, slot.keyOffsetSector * LUKS_SECTOR);
  slot.active = true;
}

/**
 * A new LUKS area (header, slot 0 keyed by `password`, the other slots disabled), as long as
 * QEMU's payload offset, and its data cipher.
 */
export function createLuks(o: LuksCreateOptions, password: Buffer): { area: Buffer; cipher: LuksCipher } {
  const spec = createCipherSpec(o);
  const masterKey = crypto().randomBytes(spec.masterKeyLen);
  const masterKeySalt = crypto().randomBytes(SALT_LEN);
  const iterTime = o.iterTime ?? 2000;
  const rate = pbkdf2Rate(spec.hash, spec.masterKeyLen);
  // QEMU's master-key digest iterations: an eighth of the time asked for, at least 1000.
  const masterKeyIterations = Math.max(MIN_ITERS, Math.min(0xffff_ffff, Math.floor(Math.floor((rate * iterTime) / 1000) / 8)));
  const per = slotSectors(spec.masterKeyLen, STRIPES);
  const h: LuksHeader = {
    version: 1, cipherName: 'aes', cipherMode: spec.cipherMode, hashSpec: spec.hash,
    payloadOffsetSector: KEY_SLOT_OFFSET / LUKS_SECTOR + NUM_SLOTS * per, masterKeyLen: spec.masterKeyLen,
    masterKeyDigest: crypto().pbkdf2Sync(masterKey, masterKeySalt, masterKeyIterations, DIGEST_LEN, spec.hash),
    masterKeySalt, masterKeyIterations, uuid: crypto().randomUUID(),
    slots: Array.from({ length: NUM_SLOTS }, (_, i) => ({
      active: false, iterations: 0, salt: Buffer.alloc(SALT_LEN), keyOffsetSector: KEY_SLOT_OFFSET / LUKS_SECTOR + i * per, stripes: STRIPES,
    })),
  };
  const area = Buffer.alloc(h.payloadOffsetSector * LUKS_SECTOR);
  storeKey(h, area, 0, password, masterKey, iterTime);
  encodeLuksHeader(h).copy(area, 0);
  return { area, cipher: new LuksCipher(spec, masterKey) };
}

/** QEMU's QDict iteration order (tdb_hash buckets), which qemu-img info's encrypt block follows. */
function qdictOrder(o: Record<string, unknown>): Record<string, unknown> {
  const hash = (name: string) => {
    let v = Math.imul(0x238f13af, name.length) >>> 0;
    for (let i = 0; i < name.length; i++) v = (v + ((name.charCodeAt(i) << ((i * 5) % 24)) >>> 0)) >>> 0;
    return ((Math.imul(1103515243, v) + 12345) >>> 0) % 512;
  };
  return Object.fromEntries(Object.entries(o).sort(([a], [b]) => hash(a) - hash(b)));
}

/** qemu-img info's `encrypt` block of a LUKS image (format-specific data, in QEMU's key order). */
export function luksInfo(h: LuksHeader): Record<string, unknown> {
  const spec = headerCipherSpec(h);
  return qdictOrder({
    format: 'luks', 'cipher-alg': spec.alg, 'cipher-mode': spec.mode, 'ivgen-alg': spec.ivgen,
    ...(spec.ivgenHash ? { 'ivgen-hash-alg': spec.ivgenHash } : {}), 'hash-alg': spec.hash,
    'payload-offset': h.payloadOffsetSector * LUKS_SECTOR, 'master-key-iters': h.masterKeyIterations, uuid: h.uuid,
    slots: h.slots.map((s) => qdictOrder(s.active
      ? { active: true, iters: s.iterations, stripes: s.stripes, 'key-offset': s.keyOffsetSector * LUKS_SECTOR }
      : { active: false, 'key-offset': s.keyOffsetSector * LUKS_SECTOR })),
  });
}

// ---- amending key slots (qemu-img amend -o encrypt.state=...) ----

export interface LuksAmendOptions {
  state: 'active' | 'inactive';
  keyslot?: number;
  newSecret?: string;
  oldSecret?: string;
  iterTime?: number;
}

/** The LUKS area of an open image, read and written in place. */
export interface LuksArea {
  read(offset: number, length: number): Promise<Buffer>;
  write(data: Buffer, offset: number): Promise<void>;
}

/** Whether `password` opens slot `i` (QEMU's load_key on one slot). */
async function slotMatches(h: LuksHeader, i: number, password: Buffer, area: LuksArea): Promise<boolean> {
  const s = h.slots[i]!;
  if (!s.active) return false;
  return (await trySlot(h, headerCipherSpec(h), s, password, (o, l) => area.read(o, l))) !== null;
}

/**
 * QEMU's LUKS amend: state=active stores the master key (unlocked by `unlockWith`) under
 * new-secret in the given or first free slot; state=inactive erases the given slot, or every
 * slot old-secret opens. Refusals are LuksError with QEMU's words, before anything is written.
 * `secret(id)` looks a secret up (undefined: no such secret).
 */
export async function amendLuksKeyslots(area: LuksArea, o: LuksAmendOptions, force: boolean, unlockWith: Buffer,
  secret: (id: string) => Buffer | undefined): Promise<void> {
  const h = decodeLuksHeader(await area.read(0, HEADER_LEN));
  const lookup = (id: string) => {
    const s = secret(id);
    if (s === undefined) throw new LuksError(`No secret with id '${id}'`);
    return s;
  };
  const active = () => h.slots.filter((s) => s.active).length;
  const checkSlot = (k: number) => {
    if (!Number.isInteger(k) || k < 0 || k >= NUM_SLOTS) throw new LuksError(`Invalid keyslot ${k} specified, must be between 0 and ${NUM_SLOTS - 1}`);
  };
  if (o.state === 'active') {
    if (o.newSecret === undefined) throw new LuksError("'new-secret' is required to activate a keyslot");
    if (o.oldSecret !== undefined) throw new LuksError("'old-secret' must not be given when activating keyslots");
    let k: number;
    if (o.keyslot !== undefined) {
      checkSlot(o.keyslot);
      k = o.keyslot;
    } else {
      k = h.slots.findIndex((s) => !s.active);
      if (k < 0) throw new LuksError("Can't add a keyslot - all keyslots are in use");
    }
    if (!force && h.slots[k]!.active) throw new LuksError(`Refusing to overwrite active keyslot ${k} - please erase it first`);
    const unlocked = await unlockLuks(h, unlockWith, (off, len) => area.read(off, len));
    if (!unlocked) throw new LuksError('Invalid password, cannot unlock any keyslot');
    const password = lookup(o.newSecret);
    const material = Buffer.alloc(materialLength(h.masterKeyLen, h.slots[k]!.stripes));
    const view = Buffer.alloc(h.slots[k]!.keyOffsetSector * LUKS_SECTOR + material.length);
    storeKey(h, view, k, password, unlocked.key, o.iterTime ?? 2000);
    // The key material first, then the header that makes the slot active.
    await area.write(view.subarray(h.slots[k]!.keyOffsetSector * LUKS_SECTOR), h.slots[k]!.keyOffsetSector * LUKS_SECTOR);
    await area.write(encodeLuksHeader(h), 0);
    return;
  }
  if (o.newSecret !== undefined) throw new LuksError("'new-secret' must not be given when erasing keyslots");
  if (o.iterTime !== undefined) throw new LuksError("'iter-time' must not be given when erasing keyslots");
  const old = o.oldSecret !== undefined ? lookup(o.oldSecret) : undefined;
  let erase: number[];
  if (o.keyslot !== undefined) {
    checkSlot(o.keyslot);
    if (old && !(await slotMatches(h, o.keyslot, old, area))) throw new LuksError(`Given keyslot ${o.keyslot} doesn't contain the given old password for erase operation`);
    if (!force && !h.slots[o.keyslot]!.active) throw new LuksError(`Given keyslot ${o.keyslot} is already erased (inactive) `);
    if (!force && active() === 1) throw new LuksError(`Attempt to erase the only active keyslot ${o.keyslot} which will erase all the data in the image irreversibly - refusing operation`);
    erase = [o.keyslot];
  } else if (old) {
    erase = [];
    for (let i = 0; i < NUM_SLOTS; i++) if (await slotMatches(h, i, old, area)) erase.push(i);
    if (!erase.length) throw new LuksError('No keyslots match given (old) password for erase operation');
    if (!force && erase.length === active()) throw new LuksError('All the active keyslots match the (old) password that was given and erasing them will erase all the data in the image irreversibly - refusing operation');
  } else {
    throw new LuksError('To erase keyslot(s), either explicit keyslot index or the password currently contained in them must be given');
  }
  for (const i of erase) {
    const s = h.slots[i]!;
    s.active = false;
    s.iterations = 0;
    s.salt = Buffer.alloc(SALT_LEN);
    // The header first (the slot no longer counts), then the material overwritten with noise.
    await area.write(encodeLuksHeader(h), 0);
    await area.write(crypto().randomBytes(materialLength(h.masterKeyLen, s.stripes)), s.keyOffsetSector * LUKS_SECTOR);
  }
}
