//! Unit conversion for the `convert` transformation and for SenML values
//! whose unit differs from the unit in the profile's schema.
//!
//! Each unit belongs to one quantity and converts to the quantity's base
//! unit as `base = value * factor + offset`. Names follow the SenML units
//! registry (RFC 8428 section 12.1: `Cel`, `Pa`, `m`, `m/s`, `J`) and the
//! symbols engineers write (`°C`, `hPa`, `km/h`, `kWh`), so a profile can use
//! either. Factors are exact definitions from the SI brochure and NIST SP 811
//! (for example 1 psi = 6894.757293168 Pa, 1 mi = 1609.344 m).

/// A physical quantity whose units convert into each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantity {
    Temperature,
    Pressure,
    Length,
    Speed,
    Energy,
    Power,
    Mass,
    Duration,
}

impl Quantity {
    fn as_str(self) -> &'static str {
        match self {
            Quantity::Temperature => "temperature",
            Quantity::Pressure => "pressure",
            Quantity::Length => "length",
            Quantity::Speed => "speed",
            Quantity::Energy => "energy",
            Quantity::Power => "power",
            Quantity::Mass => "mass",
            Quantity::Duration => "duration",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Unit {
    pub quantity: Quantity,
    factor: f64,
    offset: f64,
}

const fn unit(quantity: Quantity, factor: f64, offset: f64) -> Unit {
    Unit {
        quantity,
        factor,
        offset,
    }
}

/// Looks up a unit by name. Names are case-sensitive because SI prefixes
/// are (`mW` and `MW`).
pub fn lookup(name: &str) -> Option<Unit> {
    use Quantity::*;

    Some(match name.trim() {
        // Base: kelvin.
        "K" | "kelvin" => unit(Temperature, 1.0, 0.0),
        // Not "C" and "F": in SenML they are coulomb and farad.
        "Cel" | "°C" | "degC" | "celsius" => unit(Temperature, 1.0, 273.15),
        "°F" | "degF" | "fahrenheit" => unit(Temperature, 5.0 / 9.0, 273.15 - 32.0 * 5.0 / 9.0),
        // Base: pascal.
        "Pa" => unit(Pressure, 1.0, 0.0),
        "hPa" => unit(Pressure, 100.0, 0.0),
        "kPa" => unit(Pressure, 1e3, 0.0),
        "MPa" => unit(Pressure, 1e6, 0.0),
        "bar" => unit(Pressure, 1e5, 0.0),
        "mbar" => unit(Pressure, 100.0, 0.0),
        "psi" => unit(Pressure, 6_894.757_293_168, 0.0),
        "atm" => unit(Pressure, 101_325.0, 0.0),
        "mmHg" => unit(Pressure, 133.322_387_415, 0.0),
        "inHg" => unit(Pressure, 3_386.388_640_341, 0.0),
        // Base: metre.
        "m" => unit(Length, 1.0, 0.0),
        "km" => unit(Length, 1e3, 0.0),
        "cm" => unit(Length, 1e-2, 0.0),
        "mm" => unit(Length, 1e-3, 0.0),
        "in" => unit(Length, 0.0254, 0.0),
        "ft" => unit(Length, 0.3048, 0.0),
        "yd" => unit(Length, 0.9144, 0.0),
        "mi" => unit(Length, 1_609.344, 0.0),
        "nmi" => unit(Length, 1_852.0, 0.0),
        // Base: metre per second.
        "m/s" => unit(Speed, 1.0, 0.0),
        "km/h" | "kph" => unit(Speed, 1.0 / 3.6, 0.0),
        "mph" | "mi/h" => unit(Speed, 0.447_04, 0.0),
        "kn" | "knot" | "kt" => unit(Speed, 1_852.0 / 3_600.0, 0.0),
        "ft/s" => unit(Speed, 0.3048, 0.0),
        // Base: joule.
        "J" => unit(Energy, 1.0, 0.0),
        "kJ" => unit(Energy, 1e3, 0.0),
        "MJ" => unit(Energy, 1e6, 0.0),
        "Wh" => unit(Energy, 3_600.0, 0.0),
        "kWh" => unit(Energy, 3.6e6, 0.0),
        "MWh" => unit(Energy, 3.6e9, 0.0),
        "cal" => unit(Energy, 4.184, 0.0),
        "kcal" => unit(Energy, 4_184.0, 0.0),
        "BTU" | "Btu" => unit(Energy, 1_055.055_852_62, 0.0),
        // Base: watt.
        "W" => unit(Power, 1.0, 0.0),
        "mW" => unit(Power, 1e-3, 0.0),
        "kW" => unit(Power, 1e3, 0.0),
        "MW" => unit(Power, 1e6, 0.0),
        "hp" => unit(Power, 745.699_871_582_270_2, 0.0),
        // Base: kilogram.
        "kg" => unit(Mass, 1.0, 0.0),
        "g" => unit(Mass, 1e-3, 0.0),
        "mg" => unit(Mass, 1e-6, 0.0),
        "t" => unit(Mass, 1e3, 0.0),
        "lb" => unit(Mass, 0.453_592_37, 0.0),
        "oz" => unit(Mass, 0.028_349_523_125, 0.0),
        // Base: second.
        "s" => unit(Duration, 1.0, 0.0),
        "ms" => unit(Duration, 1e-3, 0.0),
        "min" => unit(Duration, 60.0, 0.0),
        "h" => unit(Duration, 3_600.0, 0.0),
        "d" => unit(Duration, 86_400.0, 0.0),
        _ => return None,
    })
}

/// Units that are the same thing under two names. Conversion between them
/// is the identity, and the schema check treats them as equal.
pub fn same_unit(a: &str, b: &str) -> bool {
    if a.trim() == b.trim() {
        return true;
    }
    match (lookup(a), lookup(b)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// A checked conversion from one unit to another of the same quantity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Conversion {
    from: Unit,
    to: Unit,
}

impl Conversion {
    /// Checks that both units are known and measure the same quantity.
    pub fn new(from: &str, to: &str) -> Result<Conversion, String> {
        let known = |name: &str| {
            lookup(name).ok_or_else(|| {
                format!(
                    "unknown unit {name:?}; known units are for example Cel, °F, K, hPa, psi, m, ft, km/h, mph, kWh and J (see the transformations in the profile docs)"
                )
            })
        };
        let (source, target) = (known(from)?, known(to)?);
        if source.quantity != target.quantity {
            return Err(format!(
                "cannot convert {from:?} ({}) to {to:?} ({})",
                source.quantity.as_str(),
                target.quantity.as_str()
            ));
        }
        Ok(Conversion {
            from: source,
            to: target,
        })
    }

    pub fn apply(&self, value: f64) -> f64 {
        let base = value * self.from.factor + self.from.offset;
        (base - self.to.offset) / self.to.factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn convert(value: f64, from: &str, to: &str) -> f64 {
        Conversion::new(from, to).unwrap().apply(value)
    }

    fn close(actual: f64, expected: f64) {
        assert!(
            (actual - expected).abs() <= 1e-9 * expected.abs().max(1.0),
            "{actual} != {expected}"
        );
    }

    #[test]
    fn converts_each_quantity_with_known_reference_values() {
        close(convert(100.0, "°C", "°F"), 212.0);
        close(convert(-40.0, "degF", "Cel"), -40.0);
        close(convert(0.0, "Cel", "K"), 273.15);
        close(convert(1.0, "atm", "hPa"), 1_013.25);
        close(convert(14.695_948_775, "psi", "kPa"), 101.325);
        close(convert(1.0, "mi", "km"), 1.609_344);
        close(convert(12.0, "in", "ft"), 1.0);
        close(convert(100.0, "km/h", "m/s"), 27.777_777_777_777_78);
        close(convert(1.0, "kn", "km/h"), 1.852);
        close(convert(1.0, "kWh", "MJ"), 3.6);
        close(convert(1.0, "kcal", "J"), 4_184.0);
        close(convert(1.0, "h", "min"), 60.0);
    }

    #[test]
    fn rejects_unknown_units_and_mixed_quantities() {
        assert!(
            Conversion::new("furlong", "m")
                .unwrap_err()
                .contains("unknown unit")
        );
        let mixed = Conversion::new("Cel", "m").unwrap_err();
        assert!(
            mixed.contains("temperature") && mixed.contains("length"),
            "{mixed}"
        );
    }

    #[test]
    fn aliases_are_the_same_unit() {
        assert!(same_unit("Cel", "°C"));
        assert!(same_unit("kn", "knot"));
        assert!(!same_unit("Cel", "K"));
        assert!(same_unit("%RH", "%RH"));
    }
}
