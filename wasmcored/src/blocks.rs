//! Extism's memory-block space, implemented natively: the memory that Extism's kernel
//! keeps beside a plugin's own, where inputs, outputs, errors, config values and vars are
//! passed as blocks named by handles (offsets into this space).
//!
//! The layout and the allocator follow Extism's kernel (`kernel/src/lib.rs` of
//! extism/extism) byte for byte, so handles have the same values, blocks are reused the
//! same way, and a plugin that reads raw offsets sees what it would see under Extism:
//! - a `MemoryRoot` at offset 1 (64 bytes on wasm32: a flag, then `position`, `length`,
//!   `error`, input offset and length, output offset and length), blocks from offset 65;
//! - each block a 12-byte header (status, size, used) followed by its data; the handle is the
//!   data's offset, so the first block's handle is 77;
//! - 0 is null; `length` is the requested size (0 for a freed or unknown handle); loads
//!   outside the space read 0 and stores there are ignored (the kernel's bounds checking);
//!   the space grows by 64 KiB pages, each charged to the execution's memory cap first.
//!
//! Only the bytes written so far are held: the space's size is its logical size in pages,
//! and what lies past the bytes held reads as zeros (a fresh execution does not pay for
//! zeroing a whole page it mostly never touches).
//!
//! This is a leaf module: plain data, no Wasmtime types.

use std::borrow::Cow;

const PAGE: u64 = 65536;
/// Where the kernel's `MemoryRoot` starts.
const ROOT: u64 = 1;
/// `size_of::<MemoryRoot>()` on wasm32.
const ROOT_SIZE: u64 = 64;
/// Offset of the first block header.
const BLOCKS: u64 = ROOT + ROOT_SIZE;
/// `size_of::<MemoryBlock>()` on wasm32: status (u8, padded to 4), size (u32), used (u32).
const HEADER: u64 = 12;
/// A free block at least this much larger than a request is split.
const SPLIT_SLACK: u64 = 128;

// Field offsets of the root, absolute.
const POSITION: u64 = ROOT + 8;
const LENGTH: u64 = ROOT + 16;
const ERROR: u64 = ROOT + 24;
const INPUT_OFFSET: u64 = ROOT + 32;
const INPUT_LENGTH: u64 = ROOT + 40;
const OUTPUT_OFFSET: u64 = ROOT + 48;
const OUTPUT_LENGTH: u64 = ROOT + 56;

const UNUSED: u8 = 0;
const ACTIVE: u8 = 1;
const FREE: u8 = 2;

/// What stops a block operation. Extism's kernel runs as wasm, where these are a trap
/// (an access past the end of its memory) or a failed `memory.grow` (`alloc` returns 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// An access past the end of the space.
    OutOfBounds,
    /// Growing the space was refused (the execution's memory cap).
    NoMemory,
}

/// One execution's block space.
#[derive(Debug)]
pub struct Blocks {
    /// The bytes held: a prefix of the space; the rest reads as zeros.
    mem: Vec<u8>,
    /// The space's size in bytes (whole pages).
    size: u64,
}

impl Blocks {
    /// A fresh space of one page, initialised as the kernel's `MemoryRoot::new` does. The
    /// caller has charged that page to the execution's memory.
    pub fn new() -> Blocks {
        let mut b = Blocks {
            mem: Vec::with_capacity(1024),
            size: PAGE,
        };
        b.write(ROOT, &[1]);
        b.put(LENGTH, PAGE - ROOT_SIZE);
        b
    }

    /// Bytes the space takes (what `memory_bytes` reports is the usable length).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// `len` bytes at `at`, zeros past what is held; past the space's end is a fault.
    fn read(&self, at: u64, len: usize) -> Result<Cow<'_, [u8]>, Fault> {
        let start = usize::try_from(at).map_err(|_| Fault::OutOfBounds)?;
        let end = start.checked_add(len).ok_or(Fault::OutOfBounds)?;
        if end as u64 > self.size {
            return Err(Fault::OutOfBounds);
        }
        if end <= self.mem.len() {
            return Ok(Cow::Borrowed(&self.mem[start..end]));
        }
        let mut v = vec![0; len];
        if start < self.mem.len() {
            v[..self.mem.len() - start].copy_from_slice(&self.mem[start..]);
        }
        Ok(Cow::Owned(v))
    }

    /// Write `bytes` at `at`, which the caller checked lies inside the space.
    fn write(&mut self, at: u64, bytes: &[u8]) {
        let start = at as usize;
        let end = start + bytes.len();
        debug_assert!(end as u64 <= self.size);
        if end > self.mem.len() {
            self.mem.resize(end, 0);
        }
        self.mem[start..end].copy_from_slice(bytes);
    }

    fn get(&self, at: u64) -> u64 {
        let b = self.read(at, 8).expect("the root is inside the space");
        u64::from_le_bytes(b[..].try_into().expect("8 bytes"))
    }

    fn put(&mut self, at: u64, v: u64) {
        self.write(at, &v.to_le_bytes());
    }

    fn u32_at(&self, at: u64) -> Result<u64, Fault> {
        let b = self.read(at, 4)?;
        Ok(u32::from_le_bytes(b[..].try_into().expect("4 bytes")) as u64)
    }

    fn set_u32(&mut self, at: u64, v: u64) {
        self.write(at, &(v as u32).to_le_bytes());
    }

    fn status(&self, block: u64) -> Result<u8, Fault> {
        Ok(self.read(block, 1)?[0])
    }

    fn set_status(&mut self, block: u64, s: u8) {
        self.write(block, &[s]);
    }

    fn size_of(&self, block: u64) -> Result<u64, Fault> {
        self.u32_at(block + 4)
    }

    fn used_of(&self, block: u64) -> Result<u64, Fault> {
        self.u32_at(block + 8)
    }

    /// `pointer_in_bounds_fast`: at least past the root, at most the end of the memory.
    fn in_memory(&self, p: u64) -> bool {
        p >= ROOT_SIZE && p <= self.size()
    }

    /// `pointer_in_bounds`: inside the usable block area.
    fn in_blocks(&self, p: u64) -> bool {
        p >= BLOCKS && p < BLOCKS.wrapping_add(self.get(LENGTH))
    }

    /// Allocate `n` bytes; 0 for `n == 0`. `grow(bytes)` is asked before the space grows and
    /// may refuse.
    pub fn alloc(&mut self, n: u64, grow: impl FnOnce(u64) -> bool) -> Result<u64, Fault> {
        if n == 0 {
            return Ok(0);
        }
        // A block larger than a wasm32 memory cannot exist (the kernel's sizes are 32-bit
        // and its arithmetic would wrap): refused like any allocation past the cap.
        if n > u64::from(u32::MAX) - HEADER {
            return Err(Fault::NoMemory);
        }
        let position = self.get(POSITION);
        let length = self.get(LENGTH);
        let curr = BLOCKS.wrapping_add(position);
        let mem_left = length.wrapping_sub(position).wrapping_sub(ROOT_SIZE);
        let with_header = n.wrapping_add(HEADER);
        if with_header >= mem_left {
            if with_header <= position
                && let Some(b) = self.find_free_block(n, position)?
            {
                self.set_u32(b + 8, n);
                self.set_status(b, ACTIVE);
                return Ok(b + HEADER);
            }
            let pages = (with_header - mem_left).div_ceil(PAGE);
            // A wasm32 memory has at most 65536 pages.
            let new_size = pages
                .checked_mul(PAGE)
                .and_then(|g| g.checked_add(self.size()))
                .filter(|s| *s <= 1 << 32)
                .ok_or(Fault::NoMemory)?;
            if !grow(pages * PAGE) {
                return Err(Fault::NoMemory);
            }
            self.size = new_size;
            self.put(LENGTH, length + pages * PAGE);
        }
        self.put(POSITION, position.wrapping_add(with_header));
        self.set_status(curr, ACTIVE);
        self.set_u32(curr + 4, n);
        self.set_u32(curr + 8, n);
        Ok(curr + HEADER)
    }

    fn find_free_block(&mut self, n: u64, position: u64) -> Result<Option<u64>, Fault> {
        let mut block = BLOCKS;
        while block < BLOCKS + position {
            let status = self.status(block)?;
            let size = self.size_of(block)?;
            if status == UNUSED {
                return Ok(Some(block));
            }
            if status == FREE && size >= n {
                if size - n >= SPLIT_SLACK {
                    let rest = size - n - HEADER;
                    self.set_u32(block + 4, rest);
                    self.set_u32(block + 8, 0);
                    let b1 = block + HEADER + rest;
                    self.set_u32(b1 + 4, n);
                    self.set_u32(b1 + 8, 0);
                    self.set_status(b1, FREE);
                    return Ok(Some(b1));
                }
                return Ok(Some(block));
            }
            block += HEADER + size;
        }
        Ok(None)
    }

    /// The header of the active block whose data starts at `h`, walking as the kernel does.
    fn find_block(&self, h: u64) -> Result<Option<u64>, Fault> {
        if !self.in_memory(h) {
            return Ok(None);
        }
        let mut block = BLOCKS;
        while block < BLOCKS.wrapping_add(h) {
            if self.status(block)? == ACTIVE && block + HEADER == h {
                return Ok(Some(block));
            }
            block += HEADER + self.size_of(block)?;
        }
        Ok(None)
    }

    pub fn free(&mut self, h: u64) -> Result<(), Fault> {
        if h == 0 {
            return Ok(());
        }
        if let Some(b) = self.find_block(h)? {
            self.set_status(b, FREE);
            if h == self.get(INPUT_OFFSET) {
                self.put(INPUT_LENGTH, 0);
            }
        }
        Ok(())
    }

    pub fn length(&self, h: u64) -> Result<u64, Fault> {
        if h == 0 {
            return Ok(0);
        }
        match self.find_block(h)? {
            Some(b) => self.used_of(b),
            None => Ok(0),
        }
    }

    pub fn length_unsafe(&self, h: u64) -> Result<u64, Fault> {
        if h == 0 || !self.in_memory(h) {
            return Ok(0);
        }
        let b = h - HEADER;
        if self.status(b)? != ACTIVE {
            return Ok(0);
        }
        self.used_of(b)
    }

    fn byte(&self, p: u64) -> Result<u8, Fault> {
        self.status(p)
    }

    fn word(&self, p: u64) -> Result<u64, Fault> {
        let b = self.read(p, 8)?;
        Ok(u64::from_le_bytes(b[..].try_into().expect("8 bytes")))
    }

    pub fn load_u8(&self, p: u64) -> Result<u8, Fault> {
        if !self.in_memory(p) {
            return Ok(0);
        }
        self.byte(p)
    }

    pub fn load_u64(&self, p: u64) -> Result<u64, Fault> {
        if !self.in_memory(p.wrapping_add(7)) {
            return Ok(0);
        }
        self.word(p)
    }

    pub fn store_u8(&mut self, p: u64, x: u8) -> Result<(), Fault> {
        if !self.in_memory(p) {
            return Ok(());
        }
        if p >= self.size {
            return Err(Fault::OutOfBounds);
        }
        self.write(p, &[x]);
        Ok(())
    }

    pub fn store_u64(&mut self, p: u64, x: u64) -> Result<(), Fault> {
        if !self.in_memory(p.wrapping_add(7)) {
            return Ok(());
        }
        if p.checked_add(8).is_none_or(|end| end > self.size) {
            return Err(Fault::OutOfBounds);
        }
        self.write(p, &x.to_le_bytes());
        Ok(())
    }

    pub fn input_length(&self) -> u64 {
        self.get(INPUT_LENGTH)
    }

    pub fn input_offset(&self) -> u64 {
        self.get(INPUT_OFFSET)
    }

    pub fn input_load_u8(&self, offset: u64) -> Result<u8, Fault> {
        if offset >= self.input_length() {
            return Ok(0);
        }
        self.byte(self.input_offset().wrapping_add(offset))
    }

    pub fn input_load_u64(&self, offset: u64) -> Result<u64, Fault> {
        if offset.wrapping_add(8) > self.input_length() {
            return Ok(0);
        }
        self.word(self.input_offset().wrapping_add(offset))
    }

    pub fn input_set(&mut self, h: u64, len: u64) {
        if !self.in_blocks(h) || !self.in_blocks(h.wrapping_add(len).wrapping_sub(1)) {
            return;
        }
        self.put(INPUT_OFFSET, h);
        self.put(INPUT_LENGTH, len);
    }

    pub fn output_set(&mut self, h: u64, len: u64) {
        if !self.in_blocks(h) || !self.in_blocks(h.wrapping_add(len).wrapping_sub(1)) {
            return;
        }
        self.put(OUTPUT_OFFSET, h);
        self.put(OUTPUT_LENGTH, len);
    }

    pub fn output_offset(&self) -> u64 {
        self.get(OUTPUT_OFFSET)
    }

    pub fn output_length(&self) -> u64 {
        self.get(OUTPUT_LENGTH)
    }

    pub fn error_set(&mut self, h: u64) {
        if h != 0 && !self.in_blocks(h) {
            return;
        }
        self.put(ERROR, h);
    }

    pub fn error_get(&self) -> u64 {
        self.get(ERROR)
    }

    /// The usable length of the space (the kernel's `memory_bytes`).
    pub fn memory_bytes(&self) -> u64 {
        self.get(LENGTH)
    }

    /// The kernel's `reset`: every block forgotten, input, output and error cleared.
    pub fn reset(&mut self) {
        let position = self.get(POSITION) as usize;
        let start = BLOCKS as usize;
        let end = (start + position).min(self.mem.len());
        if start < end {
            self.mem[start..end].fill(UNUSED);
        }
        for f in [
            POSITION,
            ERROR,
            INPUT_OFFSET,
            INPUT_LENGTH,
            OUTPUT_OFFSET,
            OUTPUT_LENGTH,
        ] {
            self.put(f, 0);
        }
    }

    /// `len` bytes at `h`, as the host reads a block (the output, an error, a key).
    pub fn bytes(&self, h: u64, len: u64) -> Result<Cow<'_, [u8]>, Fault> {
        self.read(h, usize::try_from(len).map_err(|_| Fault::OutOfBounds)?)
    }

    /// The whole data of the active block `h` (`None`: not a block), as the host's
    /// `memory_handle` + `memory_bytes` find it.
    pub fn block(&self, h: u64) -> Result<Option<Cow<'_, [u8]>>, Fault> {
        if h == 0 {
            return Ok(Some(Cow::Borrowed(&[])));
        }
        match self.length(h)? {
            0 => Ok(None),
            len => self.bytes(h, len).map(Some),
        }
    }

    /// Copy `data` into a new block (the host's `memory_new`); 0 for empty data.
    pub fn put_block(&mut self, data: &[u8], grow: impl FnOnce(u64) -> bool) -> Result<u64, Fault> {
        let h = self.alloc(data.len() as u64, grow)?;
        if h != 0 {
            self.write(h, data);
        }
        Ok(h)
    }
}

impl Default for Blocks {
    fn default() -> Self {
        Blocks::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yes(_: u64) -> bool {
        true
    }

    #[test]
    fn handles_and_lengths_follow_the_kernel() {
        let mut b = Blocks::new();
        assert_eq!(b.memory_bytes(), PAGE - ROOT_SIZE);
        let h1 = b.alloc(5, yes).unwrap();
        assert_eq!(h1, 77, "first block's data after the root and one header");
        let h2 = b.alloc(3, yes).unwrap();
        assert_eq!(h2, h1 + 5 + HEADER);
        assert_eq!(b.length(h1).unwrap(), 5);
        assert_eq!(b.length_unsafe(h2).unwrap(), 3);
        assert_eq!(b.alloc(0, yes).unwrap(), 0);
        assert_eq!(b.length(0).unwrap(), 0);
        // An unknown handle and a freed one have length 0.
        assert_eq!(b.length(h1 + 1).unwrap(), 0);
        b.free(h1).unwrap();
        assert_eq!(b.length(h1).unwrap(), 0);
        assert_eq!(b.length_unsafe(h1).unwrap(), 0);
        b.free(h1).unwrap();
        b.free(12345).unwrap();
    }

    #[test]
    fn out_of_range_loads_read_zero_and_stores_are_ignored() {
        let mut b = Blocks::new();
        let h = b.alloc(8, yes).unwrap();
        b.store_u64(h, 0x0102_0304_0506_0708).unwrap();
        assert_eq!(b.load_u64(h).unwrap(), 0x0102_0304_0506_0708);
        assert_eq!(b.load_u8(h).unwrap(), 8);
        assert_eq!(b.load_u8(PAGE + 10).unwrap(), 0);
        assert_eq!(b.load_u64(u64::MAX - 3).unwrap(), 0);
        assert_eq!(b.load_u8(3).unwrap(), 0, "inside the root");
        b.store_u8(PAGE + 10, 1).unwrap();
        b.store_u64(u64::MAX, 1).unwrap();
        // The last byte of the memory is in bounds for the kernel's fast check and past
        // the end for the memory itself: the kernel traps there, and so does this.
        assert_eq!(b.load_u8(PAGE), Err(Fault::OutOfBounds));
    }

    #[test]
    fn input_output_and_error() {
        let mut b = Blocks::new();
        let h = b.put_block(b"hello", yes).unwrap();
        b.input_set(h, 5);
        assert_eq!((b.input_offset(), b.input_length()), (h, 5));
        assert_eq!(b.input_load_u8(1).unwrap(), b'e');
        assert_eq!(b.input_load_u8(5).unwrap(), 0);
        assert_eq!(b.input_load_u64(0).unwrap(), 0, "fewer than 8 bytes left");
        b.output_set(h, 5);
        assert_eq!(
            &b.bytes(b.output_offset(), b.output_length()).unwrap()[..],
            b"hello"
        );
        b.output_set(0, 0);
        assert_eq!(
            b.output_offset(),
            h,
            "an out-of-range output_set is ignored"
        );
        b.error_set(h);
        assert_eq!(b.error_get(), h);
        b.error_set(PAGE * 4);
        assert_eq!(b.error_get(), h);
        b.error_set(0);
        assert_eq!(b.error_get(), 0);
        // Freeing the input block clears the input length, as the kernel does.
        b.free(h).unwrap();
        assert_eq!(b.input_length(), 0);
        b.reset();
        assert_eq!((b.input_offset(), b.output_length()), (0, 0));
        assert_eq!(b.alloc(1, yes).unwrap(), 77);
    }

    #[test]
    fn freed_blocks_are_reused_and_split() {
        let mut b = Blocks::new();
        // Fill the first page so that the next allocation looks for a free block.
        let big = b.alloc(60_000, yes).unwrap();
        let _small = b.alloc(5_000, yes).unwrap();
        b.free(big).unwrap();
        let mut grew = false;
        let h = b
            .alloc(1_000, |_| {
                grew = true;
                true
            })
            .unwrap();
        assert!(!grew, "reused the freed block");
        // Split: the new block is carved from the end of the freed one.
        assert_eq!(h, big + 60_000 - 1_000);
        assert_eq!(b.length(h).unwrap(), 1_000);
    }

    #[test]
    fn growth_is_asked_for_and_may_be_refused() {
        let mut b = Blocks::new();
        let mut asked = 0;
        let h = b
            .alloc(100_000, |n| {
                asked = n;
                true
            })
            .unwrap();
        assert_eq!(asked, PAGE);
        assert_eq!(b.length(h).unwrap(), 100_000);
        assert_eq!(b.size(), 2 * PAGE);
        assert_eq!(b.alloc(1 << 30, |_| false), Err(Fault::NoMemory));
        assert_eq!(b.alloc(u64::MAX - 5, yes), Err(Fault::NoMemory));
        assert_eq!(b.size(), 2 * PAGE, "nothing grew");
        // The grown page reads as zeros, and its last byte can be written and read.
        assert_eq!(b.load_u64(2 * PAGE - 8).unwrap(), 0);
        b.store_u8(2 * PAGE - 1, 9).unwrap();
        assert_eq!(b.load_u8(2 * PAGE - 1).unwrap(), 9);
        assert_eq!(b.store_u8(2 * PAGE, 1), Err(Fault::OutOfBounds));
    }
}
