//! The parasite blob: the ELF built by build.rs from `blob/blob.rs`, and
//! its loader (PT_LOAD segments laid out at their offsets, R_X86_64_RELATIVE
//! relocations applied for the address it will run at).

use anyhow::{bail, Context, Result};
use goblin::elf::{program_header::PT_LOAD, Elf};

/// The static-pie ELF of the parasite.
pub static BLOB_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/parasite.elf"));

const R_X86_64_RELATIVE: u32 = 8;

/// The blob laid out and relocated for one load address.
pub struct LoadedBlob {
    /// Bytes to write at the load address (segments at their vaddrs, bss zero).
    pub image: Vec<u8>,
    /// Offset of the entry point from the load address.
    pub entry: u64,
}

/// Bytes of address space the blob needs (page multiple).
pub fn span() -> Result<usize> {
    let elf = Elf::parse(BLOB_ELF).context("parsing the parasite blob ELF")?;
    Ok(span_of(&elf))
}

fn span_of(elf: &Elf) -> usize {
    let end = elf
        .program_headers
        .iter()
        .filter(|p| p.p_type == PT_LOAD)
        .map(|p| p.p_vaddr + p.p_memsz)
        .max()
        .unwrap_or(0);
    ((end as usize) + 4095) & !4095
}

/// Lay out and relocate the blob for load address `base`.
pub fn load(base: u64) -> Result<LoadedBlob> {
    let elf = Elf::parse(BLOB_ELF).context("parsing the parasite blob ELF")?;
    let mut image = vec![0u8; span_of(&elf)];
    for ph in elf.program_headers.iter().filter(|p| p.p_type == PT_LOAD) {
        let (off, len, va) = (ph.p_offset as usize, ph.p_filesz as usize, ph.p_vaddr as usize);
        let src = BLOB_ELF
            .get(off..off + len)
            .with_context(|| format!("parasite blob: segment at file offset {off:#x} beyond the file"))?;
        image[va..va + len].copy_from_slice(src);
    }
    if !elf.pltrelocs.is_empty() || !elf.dynrels.is_empty() {
        bail!("parasite blob has PLT or REL relocations; only RELA R_X86_64_RELATIVE is supported");
    }
    for r in elf.dynrelas.iter() {
        if r.r_type != R_X86_64_RELATIVE {
            bail!("parasite blob: unsupported relocation type {} at {:#x}", r.r_type, r.r_offset);
        }
        let at = r.r_offset as usize;
        let val = base.wrapping_add(r.r_addend.unwrap_or(0) as u64);
        image
            .get_mut(at..at + 8)
            .with_context(|| format!("parasite blob: relocation at {at:#x} outside the image"))?
            .copy_from_slice(&val.to_le_bytes());
    }
    if elf.entry == 0 || elf.entry as usize >= image.len() {
        bail!("parasite blob: bad entry point {:#x}", elf.entry);
    }
    Ok(LoadedBlob { image, entry: elf.entry })
}

#[cfg(test)]
mod tests {
    #[test]
    fn loads_and_relocates() {
        let b = super::load(0x7000_0000_0000).unwrap();
        assert!(b.image.len() >= 4096 && b.image.len().is_multiple_of(4096));
        assert!(b.entry > 0);
    }
}
