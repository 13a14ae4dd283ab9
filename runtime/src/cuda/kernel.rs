//! Typed kernel descriptors: a [`Kernel<A>`] names one entry point of a family and fixes its
//! argument list as the Rust tuple type `A` of [`DevicePtr`], `u64`, `i32` (C `int`) and `f32`
//! fields, so a call with a wrong argument list does not compile. The same type gives the
//! parameter list ([`Kernel::decl`]) that `dm_kernels::check` compares with the PTX `.entry` list
//! NVRTC produces, on machines without a GPU.
//!
//! The descriptors live next to their ops (`runtime/src/ops/<family>/kernels.rs`), together with
//! the family's [`KernelFamily`] (source, `-D` constants) and its grid functions; the families are
//! listed once in [`crate::ops::kernel_registry`].

use std::ffi::c_void;
use std::marker::PhantomData;

use dm_kernels::{KernelDecl, Param};

/// A device address handed to a kernel as a `T*` parameter (0 = null where the kernel allows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevicePtr(pub u64);

impl DevicePtr {
    pub const NULL: DevicePtr = DevicePtr(0);

    /// This address advanced by `elems` f32 elements.
    pub fn offset_f32(self, elems: usize) -> DevicePtr {
        DevicePtr(self.0 + 4 * elems as u64)
    }
}

/// One argument value, in the representation `cuLaunchKernel` copies from.
#[derive(Debug, Clone, Copy)]
pub enum RawArg {
    U64(u64),
    I32(i32),
    F32(f32),
}

impl RawArg {
    /// The address of the value, as `cuLaunchKernel` wants it.
    pub(crate) fn as_param(&mut self) -> *mut c_void {
        match self {
            RawArg::U64(v) => v as *mut u64 as *mut c_void,
            RawArg::I32(v) => v as *mut i32 as *mut c_void,
            RawArg::F32(v) => v as *mut f32 as *mut c_void,
        }
    }
}

/// A Rust type that is exactly one kernel parameter type.
pub trait KernelArg: Copy {
    const PARAM: Param;
    #[doc(hidden)]
    fn raw(self) -> RawArg;
}

impl KernelArg for DevicePtr {
    const PARAM: Param = Param::Ptr;
    fn raw(self) -> RawArg {
        RawArg::U64(self.0)
    }
}
impl KernelArg for u64 {
    const PARAM: Param = Param::U64;
    fn raw(self) -> RawArg {
        RawArg::U64(self)
    }
}
impl KernelArg for i32 {
    const PARAM: Param = Param::I32;
    fn raw(self) -> RawArg {
        RawArg::I32(self)
    }
}
impl KernelArg for f32 {
    const PARAM: Param = Param::F32;
    fn raw(self) -> RawArg {
        RawArg::F32(self)
    }
}

/// A whole argument list: a tuple of [`KernelArg`]s, in parameter order.
pub trait KernelArgs {
    const PARAMS: &'static [Param];
    #[doc(hidden)]
    fn raw(&self) -> Vec<RawArg>;
}

macro_rules! kernel_args_for_tuples {
    ($($t:ident $i:tt),+) => {
        impl<$($t: KernelArg),+> KernelArgs for ($($t,)+) {
            const PARAMS: &'static [Param] = &[$($t::PARAM),+];
            fn raw(&self) -> Vec<RawArg> {
                vec![$(self.$i.raw()),+]
            }
        }
    };
}
kernel_args_for_tuples!(A 0, B 1);
kernel_args_for_tuples!(A 0, B 1, C 2);
kernel_args_for_tuples!(A 0, B 1, C 2, D 3);
kernel_args_for_tuples!(A 0, B 1, C 2, D 3, E 4);
kernel_args_for_tuples!(A 0, B 1, C 2, D 3, E 4, F 5);
kernel_args_for_tuples!(A 0, B 1, C 2, D 3, E 4, F 5, G 6);
kernel_args_for_tuples!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7);
kernel_args_for_tuples!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8);
kernel_args_for_tuples!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9);
kernel_args_for_tuples!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10);
kernel_args_for_tuples!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10, L 11);
kernel_args_for_tuples!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10, L 11, M 12);
kernel_args_for_tuples!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10, L 11, M 12, N 13);
kernel_args_for_tuples!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10, L 11, M 12, N 13, O 14);
kernel_args_for_tuples!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10, L 11, M 12, N 13, O 14, P 15);
kernel_args_for_tuples!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10, L 11, M 12, N 13, O 14, P 15, Q 16);

/// One entry point of kernel family `family`, taking the arguments `A`.
pub struct Kernel<A> {
    pub family: &'static str,
    pub entry: &'static str,
    args: PhantomData<fn(A)>,
}

impl<A> Clone for Kernel<A> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<A> Copy for Kernel<A> {}

impl<A> std::fmt::Debug for Kernel<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.family, self.entry)
    }
}

impl<A: KernelArgs> Kernel<A> {
    pub const fn new(family: &'static str, entry: &'static str) -> Self {
        Self { family, entry, args: PhantomData }
    }

    /// The entry point and parameter list, for the family's list (`kernels check`, PTX test).
    pub const fn decl(&self) -> KernelDecl {
        KernelDecl { entry: self.entry, params: A::PARAMS }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuple_types_give_the_parameter_list_in_order() {
        const K: Kernel<(DevicePtr, u64, i32, f32)> = Kernel::new("fam", "k");
        assert_eq!(K.decl().params, [Param::Ptr, Param::U64, Param::I32, Param::F32]);
        let raw = (DevicePtr(8), 3u64, -1i32, 0.5f32).raw();
        assert!(matches!(raw[..], [RawArg::U64(8), RawArg::U64(3), RawArg::I32(-1), RawArg::F32(v)] if v == 0.5));
        assert_eq!(DevicePtr(16).offset_f32(3), DevicePtr(28));
    }
}
