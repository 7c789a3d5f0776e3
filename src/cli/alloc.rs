//! The binary's global allocator: mimalloc, called the way its own fast path expects.
//!
//! Why not `mimalloc::MiMalloc`: that wrapper (0.1.52) sends every allocation through
//! `mi_malloc_aligned`, and mimalloc v3 takes the aligned call's fast path only when a small
//! page's next free block happens to be aligned and the size is a power of two or small. Every
//! other request (a 4.5 KB request future, hyper's read and write buffers, any non-power-of-two
//! size over 1 KB) falls into the over-allocating generic path: measured with callgrind under
//! keep-alive load, 5.3 of the 13 allocations a request took it, ~1,600 instructions a request
//! in the allocator where plain `mi_malloc` needs a few hundred, and each such block is padded
//! by the alignment. The same was reported upstream (purpleprotocol/mimalloc_rust#170, open).
//! Here a layout that `mi_malloc` already satisfies goes to the plain calls: every mimalloc
//! block is 8-aligned (bin sizes are multiples of 8 bytes and a page's first block is
//! 16-aligned), and one whose size is a multiple of 16 lands in a bin whose size is too; only a
//! stricter alignment (tokio's 128-byte task cells) keeps the aligned calls. `mi_free` takes
//! both kinds.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// mimalloc's `MI_MAX_ALIGN_SIZE` on the 64-bit targets Breakwater builds for.
const MAX_ALIGN: usize = 16;

pub struct MiMalloc;

#[inline]
fn plain(align: usize, size: usize) -> bool {
    align <= 8 || (align == MAX_ALIGN && size.is_multiple_of(MAX_ALIGN))
}

// SAFETY: each call forwards a layout the caller guarantees valid to mimalloc's documented API;
// `mi_malloc`/`mi_zalloc`/`mi_realloc` return blocks aligned as `plain` requires (see the
// module note); pointers from either family are freed and resized by `mi_free`/`mi_realloc*`.
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let (size, align) = (layout.size(), layout.align());
        // SAFETY: see the impl's note.
        unsafe {
            if plain(align, size) {
                mi::mi_malloc(size).cast()
            } else {
                mi::mi_malloc_aligned(size, align).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let (size, align) = (layout.size(), layout.align());
        // SAFETY: see the impl's note.
        unsafe {
            if plain(align, size) {
                mi::mi_zalloc(size).cast()
            } else {
                mi::mi_zalloc_aligned(size, align).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator (GlobalAlloc's contract).
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let align = layout.align();
        // SAFETY: see the impl's note; the new block keeps the old layout's alignment.
        unsafe {
            if plain(align, new_size) {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, align).cast()
            }
        }
    }
}
