//! Large page-aligned buffers (tables, bandwidth probes), optionally backed
//! by transparent huge pages on Linux (`madvise(MADV_HUGEPAGE)` before the
//! first touch), which removes most TLB misses of a random gather over a
//! table of gigabytes.

use std::alloc::{Layout, alloc, dealloc};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

const ALIGN: usize = 2 * 1024 * 1024;

/// A heap buffer of `len` `T`s aligned to 2 MiB.
pub struct LargeBuf<T: bytemuck::Pod> {
    ptr: NonNull<T>,
    len: usize,
}

// SAFETY: LargeBuf owns its elements like a Vec<T>; T: Pod is Send + Sync.
unsafe impl<T: bytemuck::Pod + Send> Send for LargeBuf<T> {}
// SAFETY: as above; shared access only reads.
unsafe impl<T: bytemuck::Pod + Sync> Sync for LargeBuf<T> {}

impl<T: bytemuck::Pod> LargeBuf<T> {
    fn layout(len: usize) -> Layout {
        let bytes = (len * std::mem::size_of::<T>())
            .max(1)
            .next_multiple_of(ALIGN);
        Layout::from_size_align(bytes, ALIGN).expect("buffer too large")
    }

    /// `len` copies of `value`; `huge` asks for transparent huge pages (Linux).
    pub fn filled(len: usize, value: T, huge: bool) -> Self {
        let layout = Self::layout(len);
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc(layout) } as *mut T;
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        #[cfg(target_os = "linux")]
        if huge {
            // SAFETY: advice on our own, 2 MiB-aligned allocation; failure only means
            // no huge pages.
            unsafe {
                libc::madvise(raw as *mut libc::c_void, layout.size(), libc::MADV_HUGEPAGE);
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = huge;
        for i in 0..len {
            // SAFETY: i < len, inside the allocation; T is Pod (no drop).
            unsafe { raw.add(i).write(value) };
        }
        Self { ptr, len }
    }

    /// A copy of `data` in a new buffer.
    pub fn from_slice(data: &[T], huge: bool) -> Self {
        let mut b = Self::filled(data.len(), T::zeroed(), huge);
        b.copy_from_slice(data);
        b
    }
}

impl<T: bytemuck::Pod> Deref for LargeBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: ptr holds len initialised elements.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: bytemuck::Pod> DerefMut for LargeBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: ptr holds len initialised elements, uniquely owned.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: bytemuck::Pod> Drop for LargeBuf<T> {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `filled`.
        unsafe { dealloc(self.ptr.as_ptr() as *mut u8, Self::layout(self.len)) };
    }
}

/// A zeroed `Vec<f32>` of `len`; on Linux, buffers of 4 MiB and more are
/// advised onto transparent huge pages before the first touch, so zeroing a
/// fresh gradient of hundreds of MB takes a few hundred page faults instead
/// of tens of thousands.
pub fn zeroed_vec_huge(len: usize) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(len);
    #[cfg(target_os = "linux")]
    if len * 4 >= 4 << 20 {
        let start = (v.as_mut_ptr() as usize).next_multiple_of(4096);
        let end = (v.as_mut_ptr() as usize + len * 4) & !4095;
        if end > start {
            // SAFETY: advice on whole pages inside our own, not yet touched allocation;
            // failure only means no huge pages.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    v.resize(len, 0.0);
    v
}
