//! Every map and program the agent names (egress-common's `names`) exists
//! in the BPF object it embeds, so a renamed `static` or function in
//! egress-ebpf fails here rather than when an agent loads it. Needs no root.

use egress_agent::dataplane::OBJECT;
use egress_common::names;

const PROGRAMS: [&str; 6] = [
    names::PROG_SNAT_OUTBOUND,
    names::PROG_SNAT_REPLY,
    names::PROG_NEIGH_FALLBACK,
    names::PROG_LEAK_GUARD,
    names::PROG_REDIRECT_XMIT,
    names::PROG_REDIRECT_ERR,
];

#[test]
fn every_name_the_agent_uses_is_in_the_object() {
    let object = aya_obj::Object::parse(OBJECT).expect("parsing the embedded BPF object");
    for map in names::ALL_MAPS {
        assert!(
            object.maps.contains_key(map),
            "map {map} is not in the object (it has {:?})",
            object.maps.keys().collect::<Vec<_>>()
        );
    }
    for program in PROGRAMS {
        assert!(
            object.programs.contains_key(program),
            "program {program} is not in the object (it has {:?})",
            object.programs.keys().collect::<Vec<_>>()
        );
    }
    // The kernel keeps 15 characters of a name; longer ones would differ
    // between the object and what `bpftool` shows.
    for name in names::ALL_MAPS.iter().chain(&PROGRAMS) {
        assert!(name.len() <= 15, "{name} is longer than the kernel keeps");
    }
}
